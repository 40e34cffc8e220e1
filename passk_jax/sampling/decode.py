"""The sampler's device programs as pure functions of a frozen static context: ``prefill`` (the P prompts
once: their KV cache and next-token logits), ``decode`` (lockstep rows, a ``lax.while_loop`` per cache
phase) and ``decode_slots`` (continuous batching), over typed loop states. Nothing here holds state or
counts traces; `passk_jax.sampling.Sampler` jits them with the context bound.

Flow: the first token comes from the prefill logits; every step feeds one token per row and samples the
next, until every row has emitted an EOS id or max_new_tokens tokens. The P-row prompt cache is never
repeated: each row attends to its prompt's shared prefix (`attention.with_prefix`, one batched matmul per
prompt) and to its own completion cache. Tokens after a row's EOS are ``pad_id``, masked, with
log-probability 0; the EOS is part of the completion. A token's randomness depends on (key, row, position)
only (`row_keys`), so every schedule samples the same tokens."""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from passk_jax import parallel
from passk_jax.models.transformer import (KVCache, ModelConfig, Transformer, forward, init_cache, map_cache, split,
                                          unstack_layers)
from passk_jax.sampling_ops import select_tokens


@dataclasses.dataclass(frozen=True, eq=False)
class DecodeContext:
    """What the programs close over (static: it changes the program, never a value): the model graph and
    config the sampler runs, the mesh, the pad id, the KV-cache dtype and the phase schedule."""

    graphdef: Any
    cfg: ModelConfig
    mesh: Mesh | None
    pad_id: int
    kv_dtype: str | None
    phase_start: int
    max_phases: int


class LockstepState(NamedTuple):
    """The lockstep loop's state: step t, the rows' own completion cache, the last token and whether each
    row is done, each row's length, and the [rows, T] token and log-prob buffers."""

    t: jax.Array
    cache: KVCache
    tok: jax.Array
    done: jax.Array
    length: jax.Array
    tokens: jax.Array
    lp: jax.Array


class SlotState(NamedTuple):
    """The continuous-batching loop's state: per slot its row, step and last token; the next pending row;
    the slots' ring caches; the [rows + 1, T] buffers (row R absorbs idle slots), lengths and EOS hits."""

    row: jax.Array
    t: jax.Array
    tok: jax.Array
    next_row: jax.Array
    cache: KVCache
    tokens: jax.Array
    lp: jax.Array
    length: jax.Array
    eos_hit: jax.Array


def decode_phases(max_new_tokens: int, first: int = 32, max_phases: int = 4) -> tuple[int, ...]:
    """Step counts at which the decode cache grows: first, 2*first, 4*first, ..., max_new_tokens, keeping the
    last `max_phases` (each phase is one while loop in the program; attention spans only the slots the phase
    can have filled, about 3/4 of a fixed full-length cache's work for long completions)."""
    ends, end = [], first
    while end < max_new_tokens:
        ends.append(end)
        end *= 2
    return tuple(ends + [max_new_tokens])[-max_phases:]


def sampling_graph(graphdef: Any, cfg: ModelConfig, layers: str) -> tuple[Any, ModelConfig]:
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


def constrain_rows(x: jax.Array) -> jax.Array:
    return parallel.constrain(x, ("batch",) + (None,) * (x.ndim - 1))


def constrain_cache(cache: KVCache) -> KVCache:
    return map_cache(parallel.constrain, cache)


def grow(cache: KVCache, length: int) -> KVCache:
    """Pad the slots (invalid) up to `length`."""
    def pad(x, axes):
        if "length" not in axes:  # the index
            return x
        axis = axes.index("length")
        return jnp.pad(x, [(0, 0)] * axis + [(0, length - x.shape[axis])] + [(0, 0)] * (x.ndim - axis - 1))
    return constrain_cache(map_cache(pad, cache))


def prefill(ctx: DecodeContext, params, tokens, positions, mask):
    """Prompts i32[P, S] (left-padded) -> (prompt cache: P rows x S slots, next-token logits f32[P, V])."""
    n_prompts, s = tokens.shape
    cache = constrain_cache(init_cache(ctx.cfg, n_prompts, s, ctx.kv_dtype))
    if s > 1:  # all but the last column: only the cache is kept, so the LM head is dead code
        _, cache = forward(ctx.graphdef, params, tokens[:, :-1], positions[:, :-1], mask[:, :-1], cache)
    logits, cache = forward(ctx.graphdef, params, tokens[:, -1:], positions[:, -1:], mask[:, -1:], cache)
    return cache, logits[:, -1].astype(jnp.float32)


def _is_eos(tok: jax.Array, eos: jax.Array) -> jax.Array:
    return jnp.any(tok[:, None] == eos[None, :], axis=-1)


def decode(ctx: DecodeContext, params, prompt_cache, logits, next_pos, eos, temperature, top_p, top_k, key,
           *, num_samples: int, max_new_tokens: int):
    """Decode P*n rows in lockstep from the P-row prompt cache, in `decode_phases` (each a while loop that
    stops early once every row is done); returns (tokens, logprobs, mask, lengths, truncated)."""
    steps = max_new_tokens
    if not ctx.cfg.scan_layers:  # per-layer weights sliced once here, not on every decode step
        params = unstack_layers(params)
    logits = constrain_rows(jnp.repeat(logits, num_samples, axis=0))
    rows = logits.shape[0]
    row_ids = constrain_rows(jnp.arange(rows, dtype=jnp.int32))

    def pick(t, logits, done):
        tok, lp = select_rows(row_keys(key, row_ids, t), logits, temperature, top_p, top_k)
        return jnp.where(done, ctx.pad_id, tok), jnp.where(done, 0.0, lp)

    tok, lp = pick(0, logits, jnp.zeros((rows,), bool))
    buf = lambda fill, dtype, first: constrain_rows(  # noqa: E731
        jnp.full((rows, steps), fill, dtype).at[:, 0].set(first))
    phases = decode_phases(steps, ctx.phase_start, ctx.max_phases)
    # the rows' own continuation: step t writes slot t - 1; the prompt stays in the P-row prefix
    cache = constrain_cache(init_cache(ctx.cfg, rows, max(1, phases[0] - 1), ctx.kv_dtype))
    state = LockstepState(t=jnp.int32(1), cache=cache, tok=tok, done=_is_eos(tok, eos),
                          length=jnp.ones((rows,), jnp.int32), tokens=buf(ctx.pad_id, jnp.int32, tok),
                          lp=buf(0.0, jnp.float32, lp))

    def body(s: LockstepState) -> LockstepState:  # step t feeds token t-1 (completion slot t - 1), samples t
        pos = (next_pos + s.t - 1)[:, None]
        logits, cache = forward(ctx.graphdef, params, s.tok[:, None], pos, ~s.done[:, None], s.cache,
                                prefix=prompt_cache)
        tok, lp = pick(s.t, logits[:, 0].astype(jnp.float32), s.done)
        put = lambda b, x: constrain_rows(lax.dynamic_update_slice_in_dim(b, x[:, None], s.t, axis=1))  # noqa: E731
        return LockstepState(t=s.t + 1, cache=constrain_cache(cache), tok=tok, done=s.done | _is_eos(tok, eos),
                             length=s.length + (~s.done).astype(jnp.int32), tokens=put(s.tokens, tok),
                             lp=put(s.lp, lp))

    for end in phases:  # each phase stops early too once every row is done
        state = state._replace(cache=grow(state.cache, max(1, end - 1)))
        state = lax.while_loop(lambda s, end=end: (s.t < end) & ~jnp.all(s.done), body, state)
    mask = jnp.arange(steps)[None, :] < state.length[:, None]
    # A row is done exactly when it emitted an EOS (pad fills only after that), so ~done = truncated.
    return state.tokens, state.lp, mask, state.length, ~state.done


def decode_slots(ctx: DecodeContext, params, prompt_cache, logits, next_pos, eos, temperature, top_p, top_k, key,
                 *, num_samples: int, max_new_tokens: int, slots: int):
    """Continuous batching: ``slots`` decode slots work through the P*n rows in order. A slot holds one
    row (its prompt's shared prefix is attended through ``prefix_rows``) and its own completion cache, a
    ring of max_new_tokens - 1 key slots; when the row emits an EOS or reaches max_new_tokens the slot
    takes the next pending row in the same step (its first token comes from the prompt's prefill logits,
    so no prefill is redone) and its cache is invalidated. Token t of row r is drawn with
    ``row_keys(key, r, t)``, so results equal lockstep decoding; outputs are [P*n, T] in row order. KV
    memory is ``slots`` x the completion length instead of P*n x it."""
    T, n, S = max_new_tokens, num_samples, slots
    if not ctx.cfg.scan_layers:
        params = unstack_layers(params)
    R = logits.shape[0] * n
    if ctx.mesh is not None:  # any slot may read any prompt: the P-row prefix (n x smaller) on every device,
        rep = NamedSharding(ctx.mesh, PartitionSpec())  # its kv heads split over 'tensor' like the attention's
        logits, next_pos = jax.tree.map(lambda x: lax.with_sharding_constraint(x, rep), (logits, next_pos))

        def prefix(x, axes):
            axes = tuple(None if a == "batch" else a for a in axes)
            spec = parallel.logical_spec(axes, ctx.mesh, x.shape, parallel.DECODE_RULES)
            return lax.with_sharding_constraint(x, NamedSharding(ctx.mesh, spec))

        prompt_cache = map_cache(prefix, prompt_cache)
    buf = lambda fill, dtype: jnp.full((R + 1, T), fill, dtype)  # noqa: E731 - row R absorbs idle slots
    state = SlotState(row=constrain_rows(jnp.arange(S, dtype=jnp.int32)), t=constrain_rows(jnp.zeros((S,), jnp.int32)),
                      tok=constrain_rows(jnp.full((S,), ctx.pad_id, jnp.int32)), next_row=jnp.int32(S),
                      cache=constrain_cache(init_cache(ctx.cfg, S, max(1, T - 1), ctx.kv_dtype)),
                      tokens=buf(ctx.pad_id, jnp.int32), lp=buf(0.0, jnp.float32),
                      length=jnp.zeros((R + 1,), jnp.int32), eos_hit=jnp.zeros((R + 1,), bool))

    def body(s: SlotState) -> SlotState:
        row, t = s.row, s.t
        active = row < R
        fresh = t == 0  # the row's first token comes from its prompt's prefill logits
        r = jnp.minimum(row, R - 1)
        prompt = r // n
        feed = active & ~fresh
        out, cache = forward(ctx.graphdef, params, s.tok[:, None], (next_pos[r] + t - 1)[:, None],
                             feed[:, None], s.cache, prefix=prompt_cache, prefix_rows=prompt, ring=True)
        z = jnp.where(fresh[:, None], logits[prompt], out[:, 0].astype(jnp.float32))
        tok, lp = select_rows(row_keys(key, r, t), z, temperature, top_p, top_k)
        dest = jnp.where(active, row, R)
        hit = _is_eos(tok, eos)
        end = active & (hit | (t + 1 >= T))
        order = jnp.cumsum(end.astype(jnp.int32)) - 1  # finished slots take pending rows in slot order
        new_row = jnp.where(end, jnp.minimum(s.next_row + order, R), row)
        cache = cache._replace(valid=jnp.where(end[:, None], False, cache.valid))
        return SlotState(row=constrain_rows(new_row), t=constrain_rows(jnp.where(end, 0, jnp.where(active, t + 1, t))),
                         tok=constrain_rows(jnp.where(end, ctx.pad_id, tok)),
                         next_row=s.next_row + jnp.sum(end.astype(jnp.int32)), cache=constrain_cache(cache),
                         tokens=s.tokens.at[dest, t].set(tok), lp=s.lp.at[dest, t].set(lp),
                         length=s.length.at[dest].set(t + 1), eos_hit=s.eos_hit.at[dest].set(hit))

    state = lax.while_loop(lambda s: jnp.any(s.row < R), body, state)
    length = constrain_rows(state.length[:R])
    mask = jnp.arange(T)[None, :] < length[:, None]
    rows = lambda x: constrain_rows(x[:R])  # noqa: E731
    return rows(state.tokens), rows(state.lp), mask, length, ~rows(state.eos_hit)
