"""Token selection from next-token logits: temperature, exact top-k / top-p, greedy, log-probabilities.

Everything here is pure `jnp` on logits `f32[B, V]` with the sampling knobs as *traced* scalars, so one
compiled program serves every temperature / top-p / top-k.  Definitions (all on the scaled logits
z = logits / T, processors applied in the order temperature -> top-k -> top-p, as in `transformers`):

* temperature T > 0 samples from softmax(z); T == 0 is greedy: the first argmax of the raw logits, and the
  "modified" distribution is the point mass on it (its log-probability is 0).
* top-k (k >= 1, k < V) keeps every token whose z is >= the k-th largest z.  Ties with the k-th value are all
  kept, so the set never depends on token ids (deterministic, permutation invariant); k == 0 or k >= V off.
* top-p (0 < p < 1) keeps, among the top-k survivors, every token whose mass of *strictly* more probable
  tokens is < p (probabilities renormalised over the top-k set).  That is the usual nucleus (smallest
  prefix of the sorted distribution whose mass reaches p) extended by the tokens tied with its last member.
  p == 1 is off.  The argmax always survives, so the kept set is never empty.

The log-probability of a selected token is returned twice: under the modified distribution (the one it
was drawn from) and under the raw policy softmax(logits) at temperature 1, which the policy-gradient step
uses (paper Sec. 2, Eq. 1: the policy is pi_theta itself).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def _order_keys(z: jax.Array) -> jax.Array:
    """u32 keys in the order of the float32 values z (-inf < ... < 0.0 < ... < inf; no NaN). -0.0 takes the key
    of 0.0: equal values must tie."""
    z = z.astype(jnp.float32)
    bits = lax.bitcast_convert_type(jnp.where(z == 0, jnp.float32(0.0), z), jnp.uint32)
    negative = (bits >> 31) == 1
    return jnp.where(negative, ~bits, bits | jnp.uint32(0x80000000))


def _smallest_key(keys: jax.Array, true_at: callable) -> jax.Array:
    """u32[B, 1]: per row, the smallest key t with ``true_at(t)`` (bool[B, 1]), for a predicate that is
    monotone in t (False ... False True ... True) and true at the row's largest key. Exact bisection over
    the 32-bit keys: 32 passes over the row, no sort."""
    lo = jnp.min(keys, axis=-1, keepdims=True)
    hi = jnp.max(keys, axis=-1, keepdims=True)  # true_at(hi) holds

    def body(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        ok = true_at(mid)
        return jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)

    return lax.fori_loop(0, 32, body, (lo, hi))[1]


def _cutoff_mask(z: jax.Array, top_p: jax.Array, top_k: jax.Array) -> jax.Array:
    """bool[B, V]: tokens surviving top-k then top-p truncation of scaled logits z f32[B, V].

    Both thresholds are found by exact bisection over the values' order keys instead of a sort (a sort of
    a 49k vocabulary per decode step costs seconds on a CPU): the top-k threshold is the largest value with
    at least k values >= it; the top-p threshold is the smallest kept value v whose mass of strictly larger
    values is < p — in sorted order, the value of the nucleus's last member (see the module doc)."""
    vocab = z.shape[-1]
    keys = _order_keys(z)
    k_on = (top_k > 0) & (top_k < vocab)
    # largest t with count(keys >= t) >= k  ==  (smallest t with count(keys >= t + 1) < k)
    lowest = jnp.min(keys, -1, keepdims=True)
    k_key = lax.cond(k_on, lambda: _smallest_key(
        keys, lambda t: jnp.sum(keys >= t + 1, axis=-1, keepdims=True) < top_k), lambda: lowest)
    kept = keys >= k_key
    ps = jax.nn.softmax(jnp.where(kept, z, -jnp.inf), axis=-1)
    p_key = lax.cond(top_p < 1.0, lambda: _smallest_key(
        jnp.where(kept, keys, jnp.max(keys, -1, keepdims=True)),
        lambda t: jnp.sum(jnp.where(keys > t, ps, 0.0), axis=-1, keepdims=True) < top_p),
        lambda: lowest)
    return kept & (keys >= p_key)


def modified_logits(logits: jax.Array, temperature: jax.Array, top_p: jax.Array,
                    top_k: jax.Array) -> jax.Array:
    """Scaled, truncated logits f32[B, V] (-inf outside the kept set) for temperature > 0.

    For temperature <= 0 the scale is 1 and no truncation is applied (greedy ignores this distribution).
    The threshold searches only run when truncation is on (`lax.cond` on the traced knobs)."""
    logits = logits.astype(jnp.float32)
    vocab = logits.shape[-1]
    temperature = jnp.asarray(temperature, jnp.float32)
    top_p = jnp.asarray(top_p, jnp.float32)
    top_k = jnp.asarray(top_k, jnp.int32)
    greedy = temperature <= 0
    z = logits / jnp.where(greedy, 1.0, temperature)
    truncate = ~greedy & (((top_k > 0) & (top_k < vocab)) | (top_p < 1.0))
    return lax.cond(truncate,
                    lambda z: jnp.where(_cutoff_mask(z, top_p, top_k), z, -jnp.inf),
                    lambda z: z, z)


def first_argmax(x: jax.Array) -> jax.Array:
    """i32[...]: index of the first maximum along the last axis (= jnp.argmax for finite input), as two
    plain reductions, which XLA:CPU runs several times faster than argmax's variadic reduce."""
    iota = lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    first = jnp.min(jnp.where(x == jnp.max(x, axis=-1, keepdims=True), iota, x.shape[-1] - 1), axis=-1)
    return first.astype(jnp.int32)


def select_tokens(key: jax.Array, logits: jax.Array, temperature: jax.Array, top_p: jax.Array,
                  top_k: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Draw one token per row.

    Args: key (one PRNG key for the whole batch), logits f32[B, V], traced scalars temperature (0 = greedy),
      top_p in (0, 1], top_k >= 0 (0 = off).
    Returns: tokens i32[B] and their logprob f32[B] under the modified distribution (0 for greedy), the
      sampling policy the trainer's ``old_logprobs="sampler"`` needs; nothing else vocabulary-wide.
    """
    logits = logits.astype(jnp.float32)
    greedy = jnp.asarray(temperature, jnp.float32) <= 0
    z = modified_logits(logits, temperature, top_p, top_k)
    tokens = lax.cond(greedy, lambda: first_argmax(logits),  # Gumbel-max draw from softmax(z) otherwise
                      lambda: first_argmax(z + jax.random.gumbel(key, z.shape, jnp.float32)))
    logprob = jnp.take_along_axis(jax.nn.log_softmax(z, axis=-1), tokens[:, None], axis=-1)[:, 0]
    return tokens, jnp.where(greedy, 0.0, logprob)


def token_logprobs(logits: jax.Array, tokens: jax.Array, temperature: jax.Array, top_p: jax.Array,
                   top_k: jax.Array) -> jax.Array:
    """Log-probabilities of given tokens i32[...] under the modified distribution of logits f32[..., V].

    Teacher-forced counterpart of `select_tokens` (same definitions, greedy -> 0 where the token is the
    argmax and -inf elsewhere): what the tests check the sampler's log-probabilities against."""
    shape = tokens.shape
    logits = logits.reshape(-1, logits.shape[-1]).astype(jnp.float32)
    tokens = tokens.reshape(-1, 1)
    z = modified_logits(logits, temperature, top_p, top_k)
    lp = jnp.take_along_axis(jax.nn.log_softmax(z, axis=-1), tokens, axis=-1)[:, 0]
    greedy_lp = jnp.where(jnp.argmax(logits, axis=-1) == tokens[:, 0], 0.0, -jnp.inf)
    return jnp.where(jnp.asarray(temperature) <= 0, greedy_lp, lp).reshape(shape)
