"""Group rollouts: n completions of each of P prompts from one jitted prefill and one jitted decode.

Pass@k Training (paper Sec. 2-3) draws n responses per prompt and scores them as a group; the
policy-gradient step needs each response's tokens and their log-probabilities under the sampling policy.
The package is split by role:

* ``prompts``: host side: token-id lists left-padded to length buckets (`PaddedPrompts`), eager checks;
* ``weights``: the decode copy of the weights and its layout (`DecodeLayout`, `DecodeWeights`);
* ``decode``: the device programs as pure functions of a frozen `DecodeContext`: `prefill`, the lockstep
  `decode` (a while loop per cache phase) and `decode_slots` (continuous batching), over typed loop states;
* this module: `Sampler`, the host API: validate, pad, place rows on the mesh, run prefill and decode,
  return a `SampleOutput`; `lower` for plans, `compile_counts` for tests (read from the jit caches).

Flow of `Sampler.sample` (rows are prompt-major, row = p * n + j): validate; pick the smallest length bucket
>= the longest prompt and LEFT-pad the P prompts to it (per-row positions 0..len-1, so every row's last
prompt token sits in the last column); `prefill` the P prompts (not P*n) once; `decode` from the prefill
logits until every row has emitted an EOS id or max_new_tokens tokens. temperature / top_p / top_k /
eos_ids are traced, so changing them never recompiles; one compilation per (bucket, P, n, max_new_tokens).
The vocabulary-wide work of a decode step is the draw and its log-probability, nothing else.
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from passk_jax import parallel
from passk_jax.models.transformer import DTYPES, ModelConfig, cache_shardings
from passk_jax.sampling import decode as programs
from passk_jax.sampling.decode import DecodeContext, sampling_graph
from passk_jax.sampling.prompts import MAX_EOS_IDS, PaddedPrompts, as_prompt_list, default_buckets
from passk_jax.sampling.prompts import validate as validate_prompts
from passk_jax.sampling.weights import DecodeLayout, DecodeWeights
from passk_jax.timing import NO_TIMERS, Timers


class SampleOutput(NamedTuple):
    """Completions of P prompts x n samples, rows prompt-major (row = p * n + j); T = max_new_tokens."""

    tokens: jax.Array        # i32[P*n, T]  completion tokens, pad_id after the EOS
    logprobs: jax.Array      # f32[P*n, T]  log-prob under the sampling distribution (T, top-p, top-k); 0 masked
    mask: jax.Array          # bool[P*n, T] completion tokens, EOS included
    lengths: jax.Array       # i32[P*n]     number of completion tokens (EOS included)
    truncated: jax.Array     # bool[P*n]    no EOS within max_new_tokens
    prompt_index: jax.Array  # i32[P*n]     p for each row
    prompts: PaddedPrompts   # the P prompts as prefill read them (host numpy)


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
        if kv_dtype is not None and kv_dtype not in DTYPES:
            raise ValueError(f"kv_dtype must be one of {tuple(DTYPES)} or None, got {kv_dtype!r}.")
        graphdef, cfg = sampling_graph(graphdef, cfg, layers)
        self.layout = DecodeLayout(cfg, mesh, decode_layout, device_memory)
        self.graphdef, self.cfg, self.mesh, self.pad_id, self.kv_dtype = graphdef, cfg, mesh, int(pad_id), kv_dtype
        self.context = int(cfg.max_position_embeddings)
        self.buckets = tuple(sorted(set(int(b) for b in (buckets or default_buckets(self.context)))))
        if not self.buckets or self.buckets[0] < 1:
            raise ValueError(f"buckets must be positive lengths, got {buckets}.")
        if not 0 <= self.pad_id < cfg.vocab_size:
            raise ValueError(f"pad_id {pad_id} is outside the vocabulary [0, {cfg.vocab_size}).")
        self.phase_start, self.max_phases = int(phase_start), int(max_phases)
        if self.phase_start < 1 or self.max_phases < 1:
            raise ValueError(f"phase_start and max_phases must be >= 1, got {phase_start}, {max_phases}.")
        ctx = DecodeContext(graphdef, cfg, mesh, self.pad_id, kv_dtype, self.phase_start, self.max_phases)
        self._prefill = jax.jit(functools.partial(programs.prefill, ctx))
        # No donation: the P*n-row completion cache is created (and grown per phase) inside `decode`, where
        # XLA updates it in place; only the n-times smaller P-row prompt cache crosses the jit boundary.
        self._decode = jax.jit(functools.partial(programs.decode, ctx),
                               static_argnames=("num_samples", "max_new_tokens"))
        self._decode_slots = jax.jit(functools.partial(programs.decode_slots, ctx),
                                     static_argnames=("num_samples", "max_new_tokens", "slots"))

    # ---------------------------------------------------------------- decode weights (DecodeLayout)
    @property
    def decode_layout(self) -> str:
        return self.layout.decode_layout

    @property
    def device_memory(self) -> float | None:
        return self.layout.device_memory

    def decode_shardings(self, params: Any) -> Any:
        return self.layout.decode_shardings(params)

    def weight_bytes_per_device(self, params: Any) -> float:
        return self.layout.weight_bytes_per_device(params)

    def layout_for(self, params: Any) -> str:
        return self.layout.layout_for(params)

    def prepare(self, params: Any) -> DecodeWeights:
        """The weights the decode reads, made once per policy update (`DecodeLayout.prepare`)."""
        return self.layout.prepare(params)

    def abstract_weights(self, params: Any) -> DecodeWeights:
        return self.layout.abstract_weights(params)

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

    def validate(self, prompts: list[list[int]], *, num_samples: int, max_new_tokens: int,
                 temperature: float, top_p: float, top_k: int, eos_ids: Sequence[int]) -> int:
        """Eager checks (one clear ValueError each, before anything compiles); returns the bucket length."""
        return validate_prompts(prompts, buckets=self.buckets, context=self.context, vocab=self.cfg.vocab_size,
                                num_samples=num_samples, max_new_tokens=max_new_tokens, temperature=temperature,
                                top_p=top_p, top_k=top_k, eos_ids=eos_ids)

    def sample(self, params: Any, prompts: Any, *, num_samples: int, max_new_tokens: int,
               temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
               eos_ids: Sequence[int] = (), key: jax.Array, decode_slots: int = 0,
               timers: Timers = NO_TIMERS) -> SampleOutput:
        """Sample `num_samples` completions of each prompt; see SampleOutput.  temperature 0 = greedy.
        `params`: prepared `DecodeWeights` (make them once per policy update) or plain parameters.
        `decode_slots` > 0: continuous batching over that many slots (`decode.decode_slots`); the same tokens
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
