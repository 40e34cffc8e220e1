"""Group rollouts: one jitted prefill per prompt batch, one jitted `lax.while_loop` decode over P*n rows.

Pass@k Training (paper Sec. 2-3) draws n responses per prompt and scores them as a group; the
policy-gradient step needs each response's tokens and their log-probabilities under the sampling policy.

Flow of `Sampler.sample` (rows are prompt-major, row = p * n + j):

1. host: validate, pick the smallest length bucket >= the longest prompt, LEFT-pad the P prompts to it
   (per-row positions 0..len-1, so every row's last prompt token sits in the last column and all rows share
   the cache write slot during decode);
2. `prefill` (jit): run the P prompts (not P*n) through the model once -> prompt cache and next-token logits;
3. `decode` (jit): sample the first token from the prefill logits, then `lax.while_loop`s feeding one token
   per step that stop as soon as every row has emitted an EOS id or max_new_tokens tokens.  The P-row prompt
   cache is never repeated: each row attends to its prompt's shared prefix (`attention.with_prefix`, one
   batched matmul per prompt) and to its own completion cache.  The loop runs in a few phases
   (`decode_phases`) whose completion cache only has the slots that phase can fill, so attention does not
   scan the whole empty tail.  Tokens after a row's EOS are
   `pad_id`, masked, with log-probability 0; the EOS is part of the completion.

temperature / top_p / top_k / eos_ids are traced, so changing them never recompiles; one compilation per
(bucket, P, n, max_new_tokens): `Sampler.compile_counts()` reads the jit caches (nothing counts inside traced
code), and the vocabulary-wide work of a decode step is the draw and its log-probability, nothing else.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from passk_jax import parallel
from passk_jax.models.transformer import (DTYPES, KVCache, ModelConfig, Transformer, cache_shardings, forward,
                                          init_cache, map_cache, split, unstack_layers)
from passk_jax.sampling_ops import select_tokens
from passk_jax.timing import NO_TIMERS, Timers

MAX_EOS_IDS = 8  # eos_ids are padded to this many (traced), so changing them does not recompile
DECODE_LAYOUTS = ("auto", "replicated", "training")
REPLICATED_MAX_FRACTION = 0.25  # "auto": replicate the decode weights while they take at most this much memory


class DecodeWeights(NamedTuple):
    """The sampler's copy of the policy weights: compute dtype, decode layout (`Sampler.prepare`)."""

    params: Any


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


class SampleOutput(NamedTuple):
    """Completions of P prompts x n samples, rows prompt-major (row = p * n + j); T = max_new_tokens."""

    tokens: jax.Array        # i32[P*n, T]  completion tokens, pad_id after the EOS
    logprobs: jax.Array      # f32[P*n, T]  log-prob under the sampling distribution (T, top-p, top-k); 0 masked
    mask: jax.Array          # bool[P*n, T] completion tokens, EOS included
    lengths: jax.Array       # i32[P*n]     number of completion tokens (EOS included)
    truncated: jax.Array     # bool[P*n]    no EOS within max_new_tokens
    prompt_index: jax.Array  # i32[P*n]     p for each row
    prompts: PaddedPrompts   # the P prompts as prefill read them (host numpy)


def decode_phases(max_new_tokens: int, first: int = 32, max_phases: int = 4) -> tuple[int, ...]:
    """Step counts at which the decode cache grows: first, 2*first, 4*first, ..., max_new_tokens, keeping the
    last `max_phases` (each phase is one while loop in the program; attention spans only the slots the phase
    can have filled, about 3/4 of a fixed full-length cache's work for long completions)."""
    ends, end = [], first
    while end < max_new_tokens:
        ends.append(end)
        end *= 2
    return tuple(ends + [max_new_tokens])[-max_phases:]


def default_buckets(max_len: int, smallest: int = 16) -> tuple[int, ...]:
    """Powers of two >= `smallest` below `max_len`, then `max_len` itself."""
    out, b = [], smallest
    while b < max_len:
        out.append(b)
        b *= 2
    return tuple(out) + (max_len,)


def left_pad(prompts: Sequence[Sequence[int]], length: int, pad_id: int = 0
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Left-pad prompts to `length`: tokens i32[P, length], positions i32[P, length], mask bool[P, length].

    Real tokens get positions 0..len-1; padding gets position 0 and mask False."""
    n = len(prompts)
    tokens = np.full((n, length), pad_id, np.int32)
    mask = np.zeros((n, length), bool)
    lens = np.array([len(p) for p in prompts], np.int32)
    for i, p in enumerate(prompts):
        if len(p):
            tokens[i, length - len(p):] = p
            mask[i, length - len(p):] = True
    positions = np.maximum(np.arange(length, dtype=np.int32)[None] - (length - lens)[:, None], 0)
    return tokens, positions.astype(np.int32), mask


def bucket_for(buckets: Sequence[int], longest: int) -> int:
    """The smallest of the (sorted) ``buckets`` that holds a prompt of ``longest`` tokens."""
    return next(b for b in buckets if b >= longest)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class PaddedPrompts:
    """P prompts left-padded (``left_pad``) to the smallest of ``buckets`` that holds the longest: the layout
    prefill reads and the prompt columns of the train batch (``rollout.to_batch``). Host numpy; ``select``
    and ``concat`` keep that layout (they only drop or add left padding columns)."""

    tokens: np.ndarray     # i32[P, W]
    positions: np.ndarray  # i32[P, W]
    mask: np.ndarray       # bool[P, W]
    buckets: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    pad_id: int = dataclasses.field(metadata=dict(static=True))

    @classmethod
    def pad(cls, prompts: Sequence[Sequence[int]], buckets: Sequence[int], pad_id: int) -> PaddedPrompts:
        buckets = tuple(sorted(set(int(b) for b in buckets)))
        return cls(*left_pad(prompts, bucket_for(buckets, max(len(p) for p in prompts)), pad_id), buckets,
                   int(pad_id))

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def _width(self, width: int) -> PaddedPrompts:
        """The same prompts left-padded to ``width`` (as ``left_pad`` would): left columns dropped or added."""
        cut = self.tokens.shape[1] - width

        def fit(x: np.ndarray, fill: Any) -> np.ndarray:
            return x[:, cut:] if cut >= 0 else np.pad(x, ((0, 0), (-cut, 0)), constant_values=fill)

        return PaddedPrompts(fit(self.tokens, self.pad_id), fit(self.positions, 0), fit(self.mask, False),
                             self.buckets, self.pad_id)

    def select(self, keep: np.ndarray) -> PaddedPrompts:
        """The prompts where ``keep`` (bool[P]) is True, in the bucket of the longest of them."""
        keep = np.asarray(keep, bool)
        kept = PaddedPrompts(self.tokens[keep], self.positions[keep], self.mask[keep], self.buckets, self.pad_id)
        longest = int(kept.mask.sum(1).max()) if len(kept) else 1
        return kept._width(bucket_for(self.buckets, longest))

    @staticmethod
    def concat(items: Sequence[PaddedPrompts]) -> PaddedPrompts:
        """The prompts of every item in order, in the widest item's bucket."""
        width = max(item.tokens.shape[1] for item in items)
        items = [item._width(width) for item in items]
        return PaddedPrompts(*(np.concatenate([getattr(item, f) for item in items])
                               for f in ("tokens", "positions", "mask")), items[0].buckets, items[0].pad_id)


def as_prompt_list(prompts: Any) -> list[list[int]]:
    """Accept a list of token-id sequences, a 2-D array of full prompts, or a (tokens, mask) pair of 2-D
    arrays (any padding side; mask marks the real tokens)."""
    if isinstance(prompts, tuple) and len(prompts) == 2 and np.ndim(prompts[0]) == 2:
        toks, mask = np.asarray(prompts[0]), np.asarray(prompts[1], bool)
        return [row[m].tolist() for row, m in zip(toks, mask)]
    if isinstance(prompts, (np.ndarray, jax.Array)):
        if np.ndim(prompts) != 2:
            raise ValueError(f"prompt array must be 2-D [P, L], got shape {np.shape(prompts)}.")
        return np.asarray(prompts).tolist()
    return [list(map(int, p)) for p in prompts]


def _sampling_graph(graphdef: Any, cfg: ModelConfig, layers: str) -> tuple[Any, ModelConfig]:
    """The (graphdef, cfg) the sampler runs: a `Transformer` with the requested layer stack (same parameter
    structure), or the given graph unchanged."""
    if layers == "auto":
        layers = "scan" if jax.default_backend() == "cpu" else "model"
    if layers == "model" or graphdef.nodes[0].type is not Transformer:
        return graphdef, cfg
    cfg = dataclasses.replace(cfg, scan_layers=layers == "scan")
    return split(nnx.eval_shape(lambda: Transformer(cfg)))[0], cfg


def row_keys(key: jax.Array, rows: jax.Array, t: jax.Array | int) -> jax.Array:
    """The key of token ``t`` of row ``r``: fold_in(fold_in(key, r), t). A token's randomness depends on its
    row and position only, so every schedule (lockstep rows, any number of decode slots) draws the same."""
    t = jnp.broadcast_to(jnp.asarray(t, jnp.int32), rows.shape)
    return jax.vmap(lambda r, s: jax.random.fold_in(jax.random.fold_in(key, r), s))(rows, t)


def select_rows(keys: jax.Array, logits: jax.Array, temperature, top_p, top_k):
    """`select_tokens` with one key per row: keys [B], logits f32[B, V] -> (tokens, logprob)."""
    out = jax.vmap(lambda k, z: select_tokens(k, z[None], temperature, top_p, top_k))(keys, logits)
    return tuple(x[:, 0] for x in out)


class Sampler:
    """Jitted KV-cache sampler for one model graph; `params` are passed per call (they change in training).

    Args:
      graphdef, cfg: from `nnx.split(model)` / the model's ModelConfig.
      mesh: optional Mesh with axes ('data', 'fsdp', 'tensor'); rows are sharded over ('data', 'fsdp')
        (where they divide the row count), params keep their own shardings (see parallel.shard_params).
      buckets: allowed padded prompt lengths (default: powers of two >= 16 up to the model context).
      pad_id: token written after EOS and used for prompt padding.
      phase_start, max_phases: decode phase schedule (see `decode_phases`); phase_start >= max_new_tokens
        gives a single loop over a full-length cache.
      decode_layout: the weights the decode reads (see `choose_decode_layout`): "auto" (default),
        "replicated" or "training". `prepare(params)` makes that copy once per policy update; `sample`
        accepts prepared weights or plain parameters (then it prepares them itself).
      device_memory: bytes per device for the "auto" rule (default: what the runtime reports; a plan for
        another machine passes the target's).
      kv_dtype: dtype of the KV caches (default: the compute dtype).
      layers: how a `Transformer` runs its layer stack while sampling: "model" (as its config says),
        "scan" / "unrolled" (either way: the parameters are stacked in both), or "auto" (default: "scan" on
        CPU, where the scanned decode was as fast as or faster than the unrolled one, else "model": the
        unrolled decode was faster on an H100; measurements in bench/RESULTS.md).
        Other modules always run as they are.
    """

    def __init__(self, graphdef: Any, cfg: ModelConfig, *, mesh: Mesh | None = None,
                 buckets: Sequence[int] | None = None, pad_id: int = 0, phase_start: int = 32,
                 max_phases: int = 4, layers: str = "auto", decode_layout: str = "auto",
                 device_memory: float | None = None, kv_dtype: str | None = None):
        if layers not in ("auto", "model", "scan", "unrolled"):
            raise ValueError(f"layers must be 'auto', 'model', 'scan' or 'unrolled', got {layers!r}.")
        choose_decode_layout(decode_layout, 0, None)  # validates the name
        if kv_dtype is not None and kv_dtype not in DTYPES:
            raise ValueError(f"kv_dtype must be one of {tuple(DTYPES)} or None, got {kv_dtype!r}.")
        self.kv_dtype = kv_dtype
        self.decode_layout = decode_layout
        self.device_memory = device_memory_bytes() if device_memory is None else device_memory
        self._prepare_fn = None
        graphdef, cfg = _sampling_graph(graphdef, cfg, layers)
        self.graphdef, self.cfg, self.mesh, self.pad_id = graphdef, cfg, mesh, int(pad_id)
        self.context = int(cfg.max_position_embeddings)
        self.buckets = tuple(sorted(set(int(b) for b in (buckets or default_buckets(self.context)))))
        if not self.buckets or self.buckets[0] < 1:
            raise ValueError(f"buckets must be positive lengths, got {buckets}.")
        if not 0 <= self.pad_id < cfg.vocab_size:
            raise ValueError(f"pad_id {pad_id} is outside the vocabulary [0, {cfg.vocab_size}).")
        self.phase_start, self.max_phases = int(phase_start), int(max_phases)
        if self.phase_start < 1 or self.max_phases < 1:
            raise ValueError(f"phase_start and max_phases must be >= 1, got {phase_start}, {max_phases}.")
        self._prefill = jax.jit(self._prefill_fn)
        # No donation: the P*n-row completion cache is created (and grown per phase) inside `decode`, where
        # XLA updates it in place; only the n-times smaller P-row prompt cache crosses the jit boundary.
        self._decode = jax.jit(self._decode_fn, static_argnames=("num_samples", "max_new_tokens"))
        self._decode_slots = jax.jit(self._decode_slots_fn,
                                     static_argnames=("num_samples", "max_new_tokens", "slots"))

    # ---------------------------------------------------------------- decode weights
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
        need = self.weight_bytes_per_device(params)
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
        if self.layout_for(params) == "training":
            return DecodeWeights(params)
        if self._prepare_fn is None:
            dtype = DTYPES[self.cfg.dtype]
            self._prepare_fn = jax.jit(lambda p: jax.tree.map(lambda x: x.astype(dtype), p),
                                       out_shardings=self.decode_shardings(params))
        return DecodeWeights(self._prepare_fn(params))

    def abstract_weights(self, params: Any) -> DecodeWeights:
        """`prepare` on abstract parameters (ShapeDtypeStructs with shardings): shapes, dtypes and shardings
        only, for plans."""
        if isinstance(params, DecodeWeights):
            return params
        if self.layout_for(params) == "training":
            return DecodeWeights(params)
        dtype = DTYPES[self.cfg.dtype]
        shardings = self.decode_shardings(params)
        if shardings is None:
            return DecodeWeights(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype), params))
        return DecodeWeights(jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, dtype, sharding=sh),
                                          params, shardings))

    def lower(self, params: Any, *, num_prompts: int, bucket: int, num_samples: int,
              max_new_tokens: int, decode_slots: int = 0) -> dict[str, Any]:
        """The prefill and decode programs lowered (``jax.stages.Lowered``) for these shapes, on concrete or
        abstract parameters or prepared weights: `experiments.plan` compiles them for a target mesh, tests read
        their HLO."""
        weights = self.abstract_weights(jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), params)
            if not isinstance(params, DecodeWeights) else params)
        rows = lambda shape, dt: jax.ShapeDtypeStruct(  # noqa: E731
            shape, dt, sharding=None if self.mesh is None else parallel.logical_sharding(self.mesh, ("batch",), shape))
        rep = lambda shape, dt: jax.ShapeDtypeStruct(  # noqa: E731
            shape, dt, sharding=None if self.mesh is None else NamedSharding(self.mesh, PartitionSpec()))
        prompt = (rows((num_prompts, bucket), jnp.int32), rows((num_prompts, bucket), jnp.int32),
                  rows((num_prompts, bucket), jnp.bool_))
        with self._mesh_context():
            prefill = self._prefill.lower(weights.params, *prompt)
            cache, logits = jax.eval_shape(self._prefill, weights.params, *prompt)
            if self.mesh is not None:
                cache = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                                     cache, cache_shardings(self.mesh, cache))
            args = (weights.params, cache, rows(logits.shape, logits.dtype), rows((num_prompts * num_samples,), jnp.int32),
                    rep((MAX_EOS_IDS,), jnp.int32), rep((), jnp.float32), rep((), jnp.float32), rep((), jnp.int32),
                    rep((2,), jnp.uint32))
            self.check_slots(decode_slots, num_prompts * num_samples)
            if decode_slots:
                decode = self._decode_slots.lower(*args, num_samples=num_samples, max_new_tokens=max_new_tokens,
                                                  slots=decode_slots)
            else:
                decode = self._decode.lower(*args, num_samples=num_samples, max_new_tokens=max_new_tokens)
        return {"prefill": prefill, "decode": decode}

    # ---------------------------------------------------------------- host side
    def compile_counts(self) -> dict[str, int]:
        """Compiled variants held by the jit caches: {"prefill": n, "decode": n (lockstep + slots)}."""
        return {"prefill": self._prefill._cache_size(),
                "decode": self._decode._cache_size() + self._decode_slots._cache_size()}

    def compile_count(self) -> int:
        """Number of compiled variants held by the jit caches of prefill and decode."""
        return sum(self.compile_counts().values())

    def check_slots(self, slots: int, rows: int) -> None:
        """``rollout.decode_slots`` must be 0 (lockstep) or 1..rows and split evenly over the data axes."""
        dp = 1 if self.mesh is None else self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        if not 0 <= slots <= rows:
            raise ValueError(f"rollout.decode_slots must be in [0, {rows}] (0 = lockstep; at most the "
                             f"prompts x samples of a sampler call), got {slots}.")
        if slots and slots % dp:
            raise ValueError(f"rollout.decode_slots={slots} is not divisible by the data-parallel size "
                             f"data*fsdp={dp}.")

    def _rows(self, x: np.ndarray) -> jax.Array:
        """Place a host array with rows over ('data', 'fsdp') (default placement without a mesh)."""
        if self.mesh is None:
            return jnp.asarray(x)
        return parallel.put_global(x, parallel.logical_sharding(self.mesh, ("batch",), x.shape))

    def _constrain_rows(self, x: jax.Array) -> jax.Array:
        return parallel.constrain(x, ("batch",) + (None,) * (x.ndim - 1))

    def _constrain_cache(self, cache: KVCache) -> KVCache:
        return map_cache(parallel.constrain, cache)

    def validate(self, prompts: list[list[int]], *, num_samples: int, max_new_tokens: int,
                 temperature: float, top_p: float, top_k: int, eos_ids: Sequence[int]) -> int:
        """Eager checks (one clear ValueError each, before anything compiles); returns the bucket length."""
        vocab = self.cfg.vocab_size
        if len(prompts) == 0:
            raise ValueError("prompts is empty: need at least one prompt.")
        if int(num_samples) < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}.")
        if int(max_new_tokens) < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
        if not float(temperature) >= 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}.")
        if not 0 < float(top_p) <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}.")
        if int(top_k) < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}.")
        if len(eos_ids) > MAX_EOS_IDS or any(not 0 <= int(e) < vocab for e in eos_ids):
            raise ValueError(f"eos_ids must be at most {MAX_EOS_IDS} ids in [0, {vocab}), got {eos_ids}.")
        lengths = [len(p) for p in prompts]
        if min(lengths) == 0:
            raise ValueError(f"prompt {lengths.index(0)} is empty: every prompt needs at least one token.")
        longest = max(lengths)
        if longest > self.buckets[-1]:
            raise ValueError(f"prompt {lengths.index(longest)} has {longest} tokens, longer than the "
                             f"largest bucket {self.buckets[-1]}.")
        if longest + int(max_new_tokens) > self.context:
            raise ValueError(f"prompt {lengths.index(longest)} ({longest} tokens) + max_new_tokens "
                             f"{max_new_tokens} exceeds the model context {self.context}.")
        for i, p in enumerate(prompts):
            if min(p) < 0 or max(p) >= vocab:
                raise ValueError(f"prompt {i} has a token id outside the vocabulary [0, {vocab}).")
        return bucket_for(self.buckets, longest)

    def sample(self, params: Any, prompts: Any, *, num_samples: int, max_new_tokens: int,
               temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
               eos_ids: Sequence[int] = (), key: jax.Array, decode_slots: int = 0,
               timers: Timers = NO_TIMERS) -> SampleOutput:
        """Sample `num_samples` completions of each prompt; see SampleOutput.  temperature 0 = greedy.
        `params`: prepared `DecodeWeights` (make them once per policy update) or plain parameters.
        `decode_slots` > 0: continuous batching over that many slots (`_decode_slots_fn`); the same tokens
        and log-probs as lockstep decoding for one key. `timers`: reports the "prefill" and "decode" phases
        (`passk_jax.timing`)."""
        prompts = as_prompt_list(prompts)
        self.check_slots(int(decode_slots), len(prompts) * int(num_samples))
        eos_ids = tuple(int(e) for e in np.atleast_1d(np.asarray(eos_ids, np.int64)))
        self.validate(prompts, num_samples=num_samples, max_new_tokens=max_new_tokens, temperature=temperature,
                      top_p=top_p, top_k=top_k, eos_ids=eos_ids)
        n = int(num_samples)
        padded = PaddedPrompts.pad(prompts, self.buckets, self.pad_id)
        next_pos = np.repeat(padded.mask.sum(1).astype(np.int32), n)  # position of each row's first new token
        eos = np.full((MAX_EOS_IDS,), -1, np.int32)
        eos[:len(eos_ids)] = eos_ids
        params = self.prepare(params).params
        with self._mesh_context():
            with timers.phase("prefill"):
                cache, logits = timers.wait(self._prefill_padded(params, padded))
            args = (params, cache, logits, self._rows(next_pos), jnp.asarray(eos), jnp.float32(temperature),
                    jnp.float32(top_p), jnp.int32(top_k), key)
            with timers.phase("decode"):
                if decode_slots:
                    out = self._decode_slots(*args, num_samples=n, max_new_tokens=int(max_new_tokens),
                                             slots=int(decode_slots))
                else:
                    out = self._decode(*args, num_samples=n, max_new_tokens=int(max_new_tokens))
                timers.wait(out)
        prompt_index = self._rows(np.repeat(np.arange(len(prompts), dtype=np.int32), n))
        return SampleOutput(*out, prompt_index=prompt_index, prompts=padded)

    def prefill(self, params: Any, prompts: Any) -> tuple[Any, jax.Array]:
        """The prefill program alone, as ``sample`` runs it: (prompt KV cache, last-position logits f32[P, V])
        of the prompts, left-padded to their bucket (benchmarks time it; prompt log-probs come from it)."""
        prompts = as_prompt_list(prompts)
        padded = PaddedPrompts.pad(prompts, self.buckets, self.pad_id)
        with self._mesh_context():
            return self._prefill_padded(self.prepare(params).params, padded)

    def _prefill_padded(self, params: Any, padded: PaddedPrompts) -> tuple[Any, jax.Array]:
        return self._prefill(params, self._rows(padded.tokens), self._rows(padded.positions),
                             self._rows(padded.mask))

    def _mesh_context(self):
        return contextlib.nullcontext() if self.mesh is None else jax.set_mesh(self.mesh)

    # ---------------------------------------------------------------- jitted
    def _prefill_fn(self, params, tokens, positions, mask):
        """Prompts i32[P, S] (left-padded) -> (prompt cache: P rows x S slots, next-token logits f32[P, V])."""
        n_prompts, s = tokens.shape
        cache = self._constrain_cache(init_cache(self.cfg, n_prompts, s, self.kv_dtype))
        if s > 1:  # all but the last column: only the cache is kept, so the LM head is dead code
            _, cache = forward(self.graphdef, params, tokens[:, :-1], positions[:, :-1], mask[:, :-1], cache)
        logits, cache = forward(self.graphdef, params, tokens[:, -1:], positions[:, -1:], mask[:, -1:], cache)
        return cache, logits[:, -1].astype(jnp.float32)

    def _grow(self, cache: KVCache, length: int) -> KVCache:
        """Pad the slots (invalid) up to `length`."""
        def grow(x, axes):
            if "length" not in axes:  # the index
                return x
            axis = axes.index("length")
            return jnp.pad(x, [(0, 0)] * axis + [(0, length - x.shape[axis])] + [(0, 0)] * (x.ndim - axis - 1))
        return self._constrain_cache(map_cache(grow, cache))

    def _decode_fn(self, params, prompt_cache, logits, next_pos, eos, temperature, top_p, top_k, key,
                   *, num_samples: int, max_new_tokens: int):
        """Decode P*n rows from the P-row prompt cache; returns the SampleOutput fields but prompt_index and
        prompts."""
        steps = max_new_tokens
        if not self.cfg.scan_layers:  # per-layer weights sliced once here, not on every decode step
            params = unstack_layers(params)
        logits = self._constrain_rows(jnp.repeat(logits, num_samples, axis=0))
        rows = logits.shape[0]
        is_eos = lambda tok: jnp.any(tok[:, None] == eos[None, :], axis=-1)

        row_ids = self._constrain_rows(jnp.arange(rows, dtype=jnp.int32))

        def pick(t, logits, done):
            tok, lp = select_rows(row_keys(key, row_ids, t), logits, temperature, top_p, top_k)
            return jnp.where(done, self.pad_id, tok), jnp.where(done, 0.0, lp)

        tok, lp = pick(0, logits, jnp.zeros((rows,), bool))
        buf = lambda fill, dtype, first: self._constrain_rows(
            jnp.full((rows, steps), fill, dtype).at[:, 0].set(first))
        phases = decode_phases(steps, self.phase_start, self.max_phases)
        # the rows' own continuation: step t writes slot t - 1; the prompt stays in the P-row prefix
        cache = self._constrain_cache(init_cache(self.cfg, rows, max(1, phases[0] - 1), self.kv_dtype))
        state = dict(t=jnp.int32(1), cache=cache, tok=tok, done=is_eos(tok), length=jnp.ones((rows,), jnp.int32),
                     tokens=buf(self.pad_id, jnp.int32, tok), lp=buf(0.0, jnp.float32, lp))

        def body(s):  # step t feeds token t-1 (completion slot t - 1) and samples token t
            t, done = s["t"], s["done"]
            pos = (next_pos + t - 1)[:, None]
            logits, cache = forward(self.graphdef, params, s["tok"][:, None], pos, ~done[:, None], s["cache"],
                                    prefix=prompt_cache)
            tok, lp = pick(t, logits[:, 0].astype(jnp.float32), done)
            put = lambda b, x: self._constrain_rows(lax.dynamic_update_slice_in_dim(b, x[:, None], t, axis=1))
            return dict(t=t + 1, cache=self._constrain_cache(cache), tok=tok, done=done | is_eos(tok),
                        length=s["length"] + (~done).astype(jnp.int32),
                        tokens=put(s["tokens"], tok), lp=put(s["lp"], lp))

        for end in phases:  # each phase stops early too once every row is done
            state["cache"] = self._grow(state["cache"], max(1, end - 1))
            state = lax.while_loop(lambda s, end=end: (s["t"] < end) & ~jnp.all(s["done"]), body, state)
        mask = jnp.arange(steps)[None, :] < state["length"][:, None]
        # A row is done exactly when it emitted an EOS (pad fills only after that), so ~done = truncated.
        return state["tokens"], state["lp"], mask, state["length"], ~state["done"]

    def _decode_slots_fn(self, params, prompt_cache, logits, next_pos, eos, temperature, top_p, top_k, key,
                         *, num_samples: int, max_new_tokens: int, slots: int):
        """Continuous batching: ``slots`` decode slots work through the P*n rows in order. A slot holds one
        row (its prompt's shared prefix is attended through ``prefix_rows``) and its own completion cache, a
        ring of max_new_tokens - 1 key slots; when the row emits an EOS or reaches max_new_tokens the slot
        takes the next pending row in the same step (its first token comes from the prompt's prefill logits,
        so no prefill is redone) and its cache is invalidated. Token t of row r is drawn with
        ``row_keys(key, r, t)``, so results equal lockstep decoding; outputs are [P*n, T] in row order. KV
        memory is ``slots`` x the completion length instead of P*n x it."""
        T, n, S = max_new_tokens, num_samples, slots
        if not self.cfg.scan_layers:
            params = unstack_layers(params)
        R = logits.shape[0] * n
        if self.mesh is not None:  # any slot may read any prompt: the P-row prefix (n x smaller) on every device
            rep = NamedSharding(self.mesh, PartitionSpec())
            prompt_cache, logits, next_pos = jax.tree.map(lambda x: lax.with_sharding_constraint(x, rep),
                                                          (prompt_cache, logits, next_pos))
        is_eos = lambda tok: jnp.any(tok[:, None] == eos[None, :], axis=-1)  # noqa: E731
        slot_vec = lambda x: self._constrain_rows(x)  # noqa: E731 - slots lie over the data axes
        buf = lambda fill, dtype: jnp.full((R + 1, T), fill, dtype)  # noqa: E731 - row R absorbs idle slots
        state = dict(row=slot_vec(jnp.arange(S, dtype=jnp.int32)), t=slot_vec(jnp.zeros((S,), jnp.int32)),
                     tok=slot_vec(jnp.full((S,), self.pad_id, jnp.int32)), next_row=jnp.int32(S),
                     cache=self._constrain_cache(init_cache(self.cfg, S, max(1, T - 1), self.kv_dtype)),
                     tokens=buf(self.pad_id, jnp.int32), lp=buf(0.0, jnp.float32),
                     length=jnp.zeros((R + 1,), jnp.int32), eos_hit=jnp.zeros((R + 1,), bool))

        def body(s):
            row, t = s["row"], s["t"]
            active = row < R
            fresh = t == 0  # the row's first token comes from its prompt's prefill logits
            r = jnp.minimum(row, R - 1)
            prompt = r // n
            feed = active & ~fresh
            out, cache = forward(self.graphdef, params, s["tok"][:, None], (next_pos[r] + t - 1)[:, None],
                                 feed[:, None], s["cache"], prefix=prompt_cache, prefix_rows=prompt, ring=True)
            z = jnp.where(fresh[:, None], logits[prompt], out[:, 0].astype(jnp.float32))
            tok, lp = select_rows(row_keys(key, r, t), z, temperature, top_p, top_k)
            dest = jnp.where(active, row, R)
            hit = is_eos(tok)
            end = active & (hit | (t + 1 >= T))
            order = jnp.cumsum(end.astype(jnp.int32)) - 1  # finished slots take pending rows in slot order
            new_row = jnp.where(end, jnp.minimum(s["next_row"] + order, R), row)
            cache = cache._replace(valid=jnp.where(end[:, None], False, cache.valid))
            return dict(row=slot_vec(new_row), t=slot_vec(jnp.where(end, 0, jnp.where(active, t + 1, t))),
                        tok=slot_vec(jnp.where(end, self.pad_id, tok)),
                        next_row=s["next_row"] + jnp.sum(end.astype(jnp.int32)),
                        cache=self._constrain_cache(cache),
                        tokens=s["tokens"].at[dest, t].set(tok), lp=s["lp"].at[dest, t].set(lp),
                        length=s["length"].at[dest].set(t + 1),
                        eos_hit=s["eos_hit"].at[dest].set(hit))

        state = lax.while_loop(lambda s: jnp.any(s["row"] < R), body, state)
        length = self._constrain_rows(state["length"][:R])
        mask = jnp.arange(T)[None, :] < length[:, None]
        rows = lambda x: self._constrain_rows(x[:R])  # noqa: E731
        return rows(state["tokens"]), rows(state["lp"]), mask, length, ~rows(state["eos_hit"])
