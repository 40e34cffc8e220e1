"""The weights a decode reads: their layout ("replicated": the compute-dtype copy whole on every device of a
data-parallel group, so no decode step gathers a weight; "training": the FSDP-sharded parameters as they
are), the rule that picks it, and the copy made once per policy update."""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from passk_jax import parallel
from passk_jax.models import lora
from passk_jax.models.transformer import DTYPES, ModelConfig

DECODE_LAYOUTS = ("auto", "replicated", "training")
REPLICATED_MAX_FRACTION = 0.25  # "auto": replicate the decode weights while they take at most this much memory


class DecodeWeights(NamedTuple):
    """The sampler's copy of the policy weights: compute dtype, decode layout (`DecodeLayout.prepare`); for a
    LoRA policy the merged weights ``W + (alpha / r) A B``, and ``source`` the adapters they were merged from
    (the trainer checks that they are the current ones before every rollout)."""

    params: Any
    source: Any = None


def choose_decode_layout(layout: str, weight_bytes_per_device: float, device_bytes: float | None) -> str:
    """Resolve ``decode_layout``. "replicated": the weights in the compute dtype, whole on every device of a
    data-parallel group (split over the mesh's 'tensor' axis only: column-parallel q/k/v/gate/up, row-parallel
    o/down, one activation all-reduce per block), so no decode step gathers a weight; rows and KV cache are
    split over ('data', 'fsdp'). "training": the training parameters as they are (FSDP-sharded: every decode
    step all-gathers every layer's weights; the fallback for models too big to replicate). "auto":
    "replicated" when that copy takes at most REPLICATED_MAX_FRACTION of a device's memory (or the memory is
    unknown, as on CPU), else "training"."""
    if layout not in DECODE_LAYOUTS:
        raise ValueError(f"rollout.decode_layout must be one of {DECODE_LAYOUTS}, got {layout!r}.")
    if layout != "auto":
        return layout
    fits = device_bytes is None or weight_bytes_per_device <= REPLICATED_MAX_FRACTION * device_bytes
    return "replicated" if fits else "training"


def device_memory_bytes() -> float | None:
    """Memory of this process's first device as its runtime reports it (None where it reports none: CPU)."""
    try:
        stats = jax.local_devices()[0].memory_stats() or {}
    except Exception:  # noqa: BLE001 - a runtime without memory statistics
        return None
    return stats.get("bytes_limit")


def decode_copy_bytes(cfg: ModelConfig, params: Any) -> float:
    """Bytes of the whole decode copy of ``params`` (a LoRA policy: its merged base) in the compute dtype."""
    leaves = jax.tree.leaves(lora.frozen_policy(params))
    return float(sum(int(np.prod(x.shape)) for x in leaves)) * jnp.dtype(cfg.dtype).itemsize


def decode_mesh_sizes(spec: str, num_devices: int) -> tuple[int, int, int] | None:
    """``rollout.decode_mesh`` as sizes: None for "auto" / "training", else "DATA,FSDP,TENSOR" (one may be -1)
    resolved over ``num_devices``; anything else is one sentence naming the field."""
    if spec in ("auto", "training"):
        return None
    try:
        sizes = tuple(int(s) for s in spec.split(","))
        if len(sizes) != 3:
            raise ValueError
    except ValueError:
        raise ValueError(f"rollout.decode_mesh must be 'auto', 'training' or 'DATA,FSDP,TENSOR' sizes, got "
                         f"{spec!r}.") from None
    try:
        return parallel.mesh_sizes(*sizes, num_devices)
    except ValueError as err:
        raise ValueError(f"rollout.decode_mesh={spec!r}: {err}") from None


def check_decode_mesh(sizes: tuple[int, int, int], cfg: ModelConfig, slots: int, field: str) -> None:
    """A decode mesh must split the attention heads and the KV cache's heads over 'tensor' and the decode
    slots over 'data' x 'fsdp': one sentence naming ``field`` otherwise."""
    data, fsdp, tensor = sizes
    for name, heads in (("num_kv_heads", cfg.num_kv_heads), ("num_heads", cfg.num_heads)):
        if heads % tensor:
            raise ValueError(f"{field}: tensor={tensor} does not divide the model's {name}={heads}.")
    if slots % (data * fsdp):
        raise ValueError(f"{field}: rollout.decode_slots={slots} is not divisible by its data x fsdp = "
                         f"{data * fsdp}.")


def choose_decode_mesh(spec: str, train_mesh: Mesh, cfg: ModelConfig, weight_bytes: float,
                       device_memory: float | None, max_tensor: int, slots: int = 0,
                       decode_layout: str = "auto") -> Mesh:
    """The mesh the sampler lays its weights and KV cache over: the same devices, in the same order, as the
    training mesh, factored its own way. "training": the training mesh. "DATA,FSDP,TENSOR": those sizes.
    "auto": the training mesh while the decode copy (``weight_bytes`` in the compute dtype, split over its
    'tensor' axis) takes at most REPLICATED_MAX_FRACTION of a device; otherwise the smallest tensor-parallel
    split (dividing the devices, at most ``max_tensor`` wide -- the GPUs of one node -- and dividing the
    heads and the slots' data-parallel share) under which it does, rows over the rest ('data'); if none, or
    when ``decode_layout`` is "training" (decode from the training parameters as they are), the training
    mesh."""
    n = train_mesh.devices.size
    sizes = decode_mesh_sizes(spec, n)
    if sizes is None and spec == "auto" and device_memory is not None and decode_layout != "training":
        limit = REPLICATED_MAX_FRACTION * device_memory
        if weight_bytes / train_mesh.shape["tensor"] > limit:
            for t in range(train_mesh.shape["tensor"] + 1, min(n, max_tensor) + 1):
                if (n % t == 0 and cfg.num_kv_heads % t == 0 and cfg.num_heads % t == 0
                        and slots % (n // t) == 0 and weight_bytes / t <= limit):
                    sizes = (n // t, 1, t)
                    break
    if sizes is None:
        return train_mesh
    check_decode_mesh(sizes, cfg, slots, f"rollout.decode_mesh={spec!r}" if spec != "auto" else
                      f"rollout.decode_mesh='auto' chose data={sizes[0]} fsdp={sizes[1]} tensor={sizes[2]}")
    devices = np.asarray(train_mesh.devices).reshape(sizes)
    return Mesh(devices, parallel.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)


class DecodeLayout:
    """The decode-weight layout of one model on one mesh: ``decode_layout`` ("auto", "replicated",
    "training"; see `choose_decode_layout`) and the device memory the "auto" rule compares against."""

    def __init__(self, cfg: ModelConfig, mesh: Mesh | None, decode_layout: str = "auto",
                 device_memory: float | None = None):
        choose_decode_layout(decode_layout, 0, None)  # validates the name
        self.cfg, self.mesh, self.decode_layout = cfg, mesh, decode_layout
        self.device_memory = device_memory_bytes() if device_memory is None else device_memory
        self._prepare_fn = None

    def decode_shardings(self, params: Any) -> Any:
        """Shardings of the decode copy of `params` ("replicated" layout; None without a mesh)."""
        if self.mesh is None:
            return None
        return parallel.param_shardings(params, self.mesh, parallel.DECODE_RULES)

    def weight_bytes_per_device(self, params: Any) -> float:
        """Bytes per device of the "replicated" decode copy of `params` (compute dtype)."""
        itemsize = jnp.dtype(self.cfg.dtype).itemsize
        shardings = self.decode_shardings(params)
        leaves = jax.tree.leaves(params)
        if shardings is None:
            return float(sum(int(np.prod(x.shape)) for x in leaves) * itemsize)
        return float(sum(int(np.prod(sh.shard_shape(x.shape))) * itemsize
                         for x, sh in zip(leaves, jax.tree.leaves(shardings))))

    def layout_for(self, params: Any) -> str:
        """The decode layout these parameters get ("replicated" or "training"); an explicit "replicated"
        that cannot fit a device is one error naming the field."""
        need = self.weight_bytes_per_device(lora.frozen_policy(params))
        layout = choose_decode_layout(self.decode_layout, need, self.device_memory)
        if layout == "replicated" and self.device_memory is not None and need > self.device_memory:
            raise ValueError(f"rollout.decode_layout='replicated' needs {need / 2**30:.1f} GiB of weights per device "
                             f"but a device has {self.device_memory / 2**30:.1f} GiB; use 'auto' or 'training', "
                             "or split the weights over a larger mesh.tensor.")
        return layout

    def prepare(self, params: Any) -> DecodeWeights:
        """The weights the decode reads, made once per policy update: the compute-dtype copy in the decode
        layout (one jitted cast + reshard), or the parameters as they are for the "training" layout."""
        if isinstance(params, DecodeWeights):
            return params
        source = params.adapters if lora.is_lora(params) else None
        if self.layout_for(params) == "training":  # LoRA: merged in the parameters' own layout and dtype
            params = _merge_jit(params) if lora.is_lora(params) else params
            if self.mesh is None:
                return DecodeWeights(params, source)
            # the training rules on the sampler's mesh: no copy when it is the training mesh itself
            return DecodeWeights(jax.device_put(params, parallel.param_shardings(params, self.mesh)), source)
        if self._prepare_fn is None:
            dtype = DTYPES[self.cfg.dtype]
            # LoRA: W + (alpha / r) A B computed in f32 and cast in the same program (no f32 copy of the model)
            self._prepare_fn = jax.jit(lambda p: jax.tree.map(
                lambda x: x.astype(dtype), lora.merged(p, dtype) if lora.is_lora(p) else p),
                out_shardings=self.decode_shardings(lora.frozen_policy(params)))
        return DecodeWeights(self._prepare_fn(params), source)

    def abstract_weights(self, params: Any) -> DecodeWeights:
        """`prepare` on abstract parameters (ShapeDtypeStructs with shardings): shapes, dtypes and shardings
        only, for plans."""
        if isinstance(params, DecodeWeights):
            return params
        params = lora.frozen_policy(params)  # the merged weights have the base's shapes
        if self.layout_for(params) == "training":
            if self.mesh is None:
                return DecodeWeights(params)
            return DecodeWeights(jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                                              params, parallel.param_shardings(params, self.mesh)))
        dtype = DTYPES[self.cfg.dtype]
        shardings = self.decode_shardings(params)
        if shardings is None:
            return DecodeWeights(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype), params))
        return DecodeWeights(jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, dtype, sharding=sh),
                                          params, shardings))


@jax.jit
def _merge_jit(params: Any) -> Any:
    return lora.merged(params)
