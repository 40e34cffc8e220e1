"""LoRA adapters on the decoder's projections (Hu et al., 2021), as PEFT defines them: a target projection
``W`` computes ``x W + (alpha / r) (x A) B`` with ``A`` [in, r] and ``B`` [r, out], ``B = 0`` at
initialisation (so the adapted model starts as the base model exactly) and ``A`` uniform in
``+-1/sqrt(in)`` (PEFT's default, Kaiming-uniform with a = sqrt(5)).

* ``LoraConfig(rank, alpha, targets)``: which projections (``q, k, v, o, gate, up, down``) get adapters;
  ``check(model_cfg)`` names a bad field before anything is built.
* ``init_adapters(model_cfg, lora_cfg, key, mesh)``: the adapters as an ``nnx.State``
  ``{"q_proj": {"lora_a": [L, *in, r], "lora_b": [L, r, *out]}, ...}`` of ``nnx.Param`` with logical axes
  (the layer axis and the projection's own axes; the rank axis is never split), so sharding rules, optimisers
  and checkpoints treat them like model parameters.
* ``LoraParams(base, adapters, scale)``: what ``transformer.forward`` takes in place of the parameters to run
  the adapted model *unmerged* (the base weights are read, never differentiated: a gradient with respect to
  the adapters computes no base weight gradient).
* ``merged(params)``: the base parameters with ``W + (alpha / r) A B`` in place of each target (the decode
  copy, the merged export).
* ``save_peft(...)``: a PEFT adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``) that
  ``peft.PeftModel.from_pretrained`` loads onto the base checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from passk_jax.models.transformer import ModelConfig, param_specs

# config name -> projection; the projections' input dims (o_proj reads [heads, head_dim])
TARGETS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj",
           "down": "down_proj"}
CONTRACT = {"o_proj": 2}
PEFT_MODULES = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
                "o_proj": "self_attn.o_proj", "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
                "down_proj": "mlp.down_proj"}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """``rank`` r >= 1, ``alpha`` > 0 (scale alpha / r), ``targets`` a non-empty subset of ``TARGETS``."""

    rank: int
    alpha: float = 32.0
    targets: tuple[str, ...] = tuple(TARGETS)

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"model.lora_rank must be an integer >= 1 for LoRA (0 turns it off), got {self.rank!r}.")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"model.lora_alpha must be a finite number > 0, got {self.alpha!r}.")
        targets = tuple(self.targets)
        bad = [t for t in targets if t not in TARGETS]
        if not targets or bad or len(set(targets)) != len(targets):
            raise ValueError(f"model.lora_targets must be distinct names from {tuple(TARGETS)}, got {targets!r}"
                             + (f" ({', '.join(map(repr, bad))} is not a projection of the decoder)" if bad else "")
                             + ".")
        object.__setattr__(self, "targets", targets)

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank

    @property
    def modules(self) -> tuple[str, ...]:
        """The projections adapted (parameter names: "q_proj", ...)."""
        return tuple(TARGETS[t] for t in self.targets)

    def shapes(self, cfg: ModelConfig) -> dict[str, tuple[tuple, tuple, tuple, tuple]]:
        """projection -> (A shape, A logical axes, B shape, B logical axes), layers axis first."""
        specs = param_specs(cfg)
        out = {}
        for name in self.modules:
            (L, *shape), (_, *axes), _ = specs[f"layers.{name}"]
            c = CONTRACT.get(name, 1)
            out[name] = ((L, *shape[:c], self.rank), ("layers", *axes[:c], None),
                         (L, self.rank, *shape[c:]), ("layers", None, *axes[c:]))
        return out

    def check(self, cfg: ModelConfig) -> LoraConfig:
        """The rank fits every target matrix (r <= min(in, out)). Returns itself."""
        for name, ((_, *a_shape), _, (_, _, *b_shape), _) in self.shapes(cfg).items():
            fan_in, fan_out = math.prod(a_shape[:-1]), math.prod(b_shape)
            if self.rank > min(fan_in, fan_out):
                raise ValueError(f"model.lora_rank={self.rank} is larger than the {name} matrix allows "
                                 f"({fan_in} x {fan_out}: at most {min(fan_in, fan_out)}).")
        return self


@struct.dataclass
class LoraParams:
    """The adapted model for ``transformer.forward``: the frozen ``base`` parameters, the ``adapters`` and the
    static ``scale`` alpha / r."""

    base: Any
    adapters: Any
    scale: float = struct.field(pytree_node=False)


def init_adapters(cfg: ModelConfig, lora: LoraConfig, key: jax.Array,
                  mesh: jax.sharding.Mesh | None = None) -> nnx.State:
    """Fresh adapters (A uniform in +-1/sqrt(in), B zero) in float32 whatever the base's ``param_dtype`` (a
    bf16 base trains f32 adapters and optimiser state); sharded on ``mesh``."""
    from passk_jax.parallel import param_shardings

    lora.check(cfg)
    shapes = lora.shapes(cfg)
    dtype = jnp.float32

    def build():
        out = {}
        for i, (name, (a_shape, a_axes, b_shape, b_axes)) in enumerate(shapes.items()):
            bound = 1.0 / math.sqrt(math.prod(a_shape[1:-1]))
            a = jax.random.uniform(jax.random.fold_in(key, i), a_shape, jnp.float32, -bound, bound)
            out[name] = {"lora_a": nnx.Param(a.astype(dtype), out_sharding=a_axes, eager_sharding=False),
                         "lora_b": nnx.Param(jnp.zeros(b_shape, dtype), out_sharding=b_axes, eager_sharding=False)}
        return nnx.State(out)

    shardings = None if mesh is None else param_shardings(jax.eval_shape(build), mesh)
    return jax.jit(build, out_shardings=shardings)()


def delta(a: jax.Array, b: jax.Array, shape: tuple[int, ...], scale: float) -> jax.Array:
    """(alpha / r) A B of one stacked projection, in float32, shaped like its weight ``shape`` ([L, ...])."""
    L, r = a.shape[0], a.shape[-1]
    d = jnp.einsum("lir,lro->lio", a.reshape(L, -1, r).astype(jnp.float32),
                   b.reshape(L, r, -1).astype(jnp.float32))
    return (scale * d).reshape(shape)


def merged(params: LoraParams, dtype: Any = None) -> Any:
    """The base parameters with each target weight replaced by ``W + (alpha / r) A B`` (computed in float32,
    stored in ``dtype`` or the weight's own dtype); other parameters are shared, not copied."""
    out = jax.tree.map(lambda x: x, params.base)  # new States, the same leaves
    for name, ab in params.adapters.items():
        w = out["layers"][name]
        a, b = ab["lora_a"][...], ab["lora_b"][...]
        out["layers"][name] = jax.tree.map(
            lambda x: (x.astype(jnp.float32) + delta(a, b, x.shape, params.scale)).astype(dtype or x.dtype), w)
    return out


# --------------------------------------------------------------------------------------------- PEFT
def peft_tensors(adapters: Any, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """PEFT's tensor names and layouts: ``base_model.model.model.layers.{i}.<module>.lora_A.weight`` [r, in]
    and ``.lora_B.weight`` [out, r] (torch Linear layout, HF's flattening of the head axes)."""
    out = {}
    for name, ab in adapters.items():
        a = np.asarray(jax.device_get(ab["lora_a"][...]), np.float32)
        b = np.asarray(jax.device_get(ab["lora_b"][...]), np.float32)
        for i in range(cfg.num_layers):
            prefix = f"base_model.model.model.layers.{i}.{PEFT_MODULES[name]}"
            r = a.shape[-1]
            out[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a[i].reshape(-1, r).T)
            out[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b[i].reshape(r, -1).T)
    return out


def save_peft(out_dir: str, adapters: Any, cfg: ModelConfig, lora: LoraConfig, base_path: str = "") -> None:
    """A PEFT LoRA directory for ``peft.PeftModel.from_pretrained(base_model, out_dir)`` (float32 tensors)."""
    from safetensors.numpy import save_file

    os.makedirs(out_dir, exist_ok=True)
    save_file(peft_tensors(adapters, cfg), os.path.join(out_dir, "adapter_model.safetensors"),
              metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.rank, "lora_alpha": float(lora.alpha),
              "target_modules": sorted(lora.modules), "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
              "use_rslora": False, "use_dora": False, "init_lora_weights": True, "inference_mode": True,
              "modules_to_save": None, "layers_to_transform": None, "base_model_name_or_path": base_path or None}
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)


def is_lora(params: Any) -> bool:
    return isinstance(params, LoraParams)


def trainable(params: Any) -> Any:
    """What an optimiser updates: the adapters of ``LoraParams``, else the parameters themselves."""
    return params.adapters if isinstance(params, LoraParams) else params


def with_trainable(params: Any, new: Any) -> Any:
    """``params`` with its trainable part replaced by ``new`` (the inverse of ``trainable``)."""
    return params.replace(adapters=new) if isinstance(params, LoraParams) else new


def frozen_policy(params: Any) -> Any:
    """The model with the adapters switched off (the base; the parameters themselves without LoRA)."""
    return params.base if isinstance(params, LoraParams) else params
