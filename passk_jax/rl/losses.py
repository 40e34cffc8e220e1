"""Per-token policy-gradient losses for RLVR: clipped surrogate, KL, entropy, aggregation.

Everything here is a pure function of per-token arrays ``[B, S]`` (rows x positions) plus a boolean
``mask`` of the tokens that count (completion tokens of valid rollouts). Losses are *aggregated* into a
``(sum, denominator)`` pair: sums and denominators both add across micro-batches and devices, so the
mini-batch loss ``global_sum / global_denominator`` is identical for every micro-batch partition and every
data-parallel size (the loss-normalisation bug of verl #5625 cannot happen by construction).

The paper (``docs/paper.md`` section 1) trains with DAPO's clip-higher (eps_low 0.2, eps_high 0.28)
and the token-level loss, no KL and no entropy bonus; the other options are the peers' usual ones.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from passk_jax.registry import Registry

RATIO_LEVELS: tuple[str, ...] = ("token", "sequence")


# ----------------------------------------------------------------------------- logits -> per token
def token_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """log p(targets[b, s] | logits[b, s]) for logits f32[B, S, V], targets i32[B, S] -> f32[B, S].

    Uses ``logit[target] - logsumexp`` so no second [B, S, V] log-softmax array is needed.
    """
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked - lse


def entropy_from_logits(logits: jax.Array) -> jax.Array:
    """Shannon entropy (nats) of softmax(logits) per position: f32[B, S, V] -> f32[B, S]."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    probs = jnp.exp(logits - lse)
    return lse[..., 0] - jnp.sum(probs * logits, axis=-1)


def shifted_logprobs_and_entropy(
    logits: jax.Array, tokens: jax.Array, temperature: float = 1.0
) -> tuple[jax.Array, jax.Array]:
    """Next-token view aligned with ``tokens``: out[b, s] scores tokens[b, s] given tokens[b, :s].

    logits f32[B, S, V] from a causal forward over tokens i32[B, S]; position 0 has no prediction and gets 0.
    ``temperature`` divides the logits first (the policy that sampled at temperature T is softmax(z / T)).
    Returns (logprobs f32[B, S], entropy f32[B, S]).
    """
    z = logits[:, :-1].astype(jnp.float32)
    if temperature != 1.0:
        z = z / temperature
    lp = token_logprobs(z, tokens[:, 1:])
    ent = entropy_from_logits(z)
    pad = jnp.zeros_like(lp[:, :1])
    return jnp.concatenate([pad, lp], axis=1), jnp.concatenate([pad, ent], axis=1)


def chunked_shifted_logprobs_and_entropy(
    hidden: jax.Array, head: jax.Array, tokens: jax.Array, temperature: float = 1.0, chunk: int = 512
) -> tuple[jax.Array, jax.Array]:
    """``shifted_logprobs_and_entropy(hidden @ head, tokens, temperature)`` without the [B, S, V] logits.

    hidden [B, S, D] (final-norm hidden states), head [D, V]; the logits of ``chunk`` positions at a time are
    computed, reduced to a log-prob and an entropy per position, and dropped. The chunk function is
    rematerialised, so the backward pass recomputes one chunk's logits at a time too: peak memory for the
    head is O(B x chunk x V) instead of several [B, S, V] float32 arrays (with a 152k vocabulary and 2.5k
    positions that is 1.5 GB per row each).
    """
    B, S, D = hidden.shape
    n = S - 1  # predicted positions
    if n == 0:
        zeros = jnp.zeros((B, S), jnp.float32)
        return zeros, zeros
    C = max(1, min(int(chunk), n))
    chunks = -(-n // C)
    h = jnp.pad(hidden[:, :-1], ((0, 0), (0, chunks * C - n), (0, 0)))
    t = jnp.pad(tokens[:, 1:], ((0, 0), (0, chunks * C - n)))
    h = jnp.swapaxes(h.reshape(B, chunks, C, D), 0, 1)
    t = jnp.swapaxes(t.reshape(B, chunks, C), 0, 1)

    @jax.checkpoint
    def one(args):
        hx, tx = args
        z = jnp.einsum("bsd,dv->bsv", hx, head.astype(hx.dtype), preferred_element_type=jnp.float32)
        if temperature != 1.0:
            z = z / temperature
        return token_logprobs(z, tx), entropy_from_logits(z)

    lp, ent = jax.lax.map(one, (h, t))
    unchunk = lambda x: jnp.swapaxes(x, 0, 1).reshape(B, chunks * C)[:, :n]  # noqa: E731
    pad = jnp.zeros((B, 1), jnp.float32)
    return jnp.concatenate([pad, unchunk(lp)], axis=1), jnp.concatenate([pad, unchunk(ent)], axis=1)


# ----------------------------------------------------------------------------- aggregation
@dataclasses.dataclass(frozen=True)
class Aggregation:
    """A loss aggregation: each row's numerator from its masked sum and token count, and the denominator
    from the rows' token counts and the normalising length. Both add over any split of the rows, because the
    step divides each micro-batch's sum by the whole mini-batch's denominator."""

    doc: str
    row_value: Callable[[jax.Array, jax.Array], jax.Array]  # (row sums f32[B], token counts f32[B]) -> f32[B]
    denominator: Callable[[jax.Array, int], jax.Array]      # (token counts f32[B], length) -> f32[]


AGGREGATION_REGISTRY: Registry[Aggregation] = Registry("loss aggregation")
AGGREGATION_REGISTRY.register("token_mean", Aggregation(
    "DAPO, the paper's default: sum over all valid tokens / number of valid tokens",
    lambda sums, counts: sums, lambda counts, length: jnp.sum(counts)))
AGGREGATION_REGISTRY.register("seq_mean_token_mean", Aggregation(
    "GRPO: per-row token mean, then mean over the rows that have tokens",
    lambda sums, counts: sums / jnp.maximum(counts, 1.0),
    lambda counts, length: jnp.sum((counts > 0).astype(jnp.float32))))
AGGREGATION_REGISTRY.register("seq_mean_token_sum_norm", Aggregation(
    "Dr.GRPO: per-row token sum / (rows with tokens x norm_length; default the padded width S)",
    lambda sums, counts: sums,
    lambda counts, length: jnp.sum((counts > 0).astype(jnp.float32)) * jnp.float32(length)))
AGGREGATIONS: tuple[str, ...] = AGGREGATION_REGISTRY.names()


def _row_counts(mask: jax.Array) -> jax.Array:
    return jnp.sum(mask.astype(jnp.float32), axis=-1)


def loss_denominator(mask: jax.Array, mode: str, norm_length: int | None = None) -> jax.Array:
    """The denominator of ``aggregate`` alone (depends on the mask only, never on the parameters; see
    ``AGGREGATION_REGISTRY``); ``norm_length`` (Dr.GRPO) defaults to S, the padded width: a constant
    generation budget, as Dr.GRPO prescribes."""
    agg = AGGREGATION_REGISTRY.lookup(mode)
    return agg.denominator(_row_counts(mask), mask.shape[-1] if norm_length is None else norm_length)


def aggregate_sum(values: jax.Array, mask: jax.Array, mode: str) -> jax.Array:
    """The numerator of ``aggregate``; additive over any split of the rows."""
    agg = AGGREGATION_REGISTRY.lookup(mode)
    row_sums = jnp.sum(values * mask.astype(jnp.float32), axis=-1)
    return jnp.sum(agg.row_value(row_sums, _row_counts(mask)))


def aggregate(
    values: jax.Array, mask: jax.Array, mode: str, norm_length: int | None = None
) -> tuple[jax.Array, jax.Array]:
    """Aggregate per-token values f32[B, S] under ``mask`` into a (sum, denominator) pair, by the registered
    aggregation ``mode`` (``AGGREGATION_REGISTRY``: token_mean, seq_mean_token_mean, seq_mean_token_sum_norm).
    Both parts add over row partitions; the loss is ``finalize(sum_total, denominator_total)``."""
    return aggregate_sum(values, mask, mode), loss_denominator(mask, mode, norm_length)


def finalize(total: jax.Array, denominator: jax.Array) -> jax.Array:
    """total / denominator, and exactly 0 when nothing was counted (never NaN)."""
    return jnp.where(denominator > 0, total / jnp.maximum(denominator, 1e-30), 0.0)


# ----------------------------------------------------------------------------- surrogate
def log_ratio(
    logp: jax.Array,
    old_logp: jax.Array,
    mask: jax.Array,
    *,
    ratio_level: str = "token",
    log_ratio_clip: float | None = 20.0,
) -> jax.Array:
    """log(pi / pi_old) per token, clamped to +-``log_ratio_clip`` (gradient 0 outside the clamp).

    ``ratio_level="sequence"`` is GSPO-token (Zheng et al. 2025): every token of row i gets the value of
    the length-normalised sequence log-ratio mean_t(log pi - log pi_old) with the gradient of its own
    log pi, i.e. ``sg(seq) + logp - sg(logp)``; with ``seq_mean_token_mean`` this is exactly GSPO.
    """
    if ratio_level not in RATIO_LEVELS:
        raise ValueError(f"ratio_level {ratio_level!r} is unknown; choose one of {RATIO_LEVELS}.")
    lr = logp - old_logp
    if ratio_level == "sequence":
        m = mask.astype(jnp.float32)
        seq = jnp.sum(lr * m, axis=-1, keepdims=True) / jnp.maximum(jnp.sum(m, -1, keepdims=True), 1.0)
        lr = jax.lax.stop_gradient(seq) + logp - jax.lax.stop_gradient(logp)
    if log_ratio_clip is not None:
        lr = jnp.clip(lr, -log_ratio_clip, log_ratio_clip)
    return lr


def clipped_surrogate(
    log_ratio_: jax.Array,
    advantages: jax.Array,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    dual_clip: float | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Per-token PPO loss with clip-higher and optional dual-clip (to be minimised).

    loss = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high)); with dual clip c > 1 and A < 0 the loss is
    additionally capped at -c A (Ye et al. 2020). Returns (loss f32[B, S], flags) where the flags
    (float 0/1 per token) mark where a clip is active: ``clip_low`` (A < 0, r < 1 - eps_low),
    ``clip_high`` (A > 0, r > 1 + eps_high), ``clip_dual`` (A < 0, r > c).
    """
    ratio = jnp.exp(log_ratio_)
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
    loss = jnp.maximum(unclipped, clipped)
    flags = {
        "clip_low": ((advantages < 0) & (ratio < 1.0 - eps_low)).astype(jnp.float32),
        "clip_high": ((advantages > 0) & (ratio > 1.0 + eps_high)).astype(jnp.float32),
    }
    if dual_clip is not None:
        capped = jnp.minimum(loss, -advantages * dual_clip)
        loss = jnp.where(advantages < 0, capped, loss)
        flags["clip_dual"] = ((advantages < 0) & (ratio > dual_clip)).astype(jnp.float32)
    else:
        flags["clip_dual"] = jnp.zeros_like(loss)
    return loss, flags


# ----------------------------------------------------------------------------- KL
# Per-token estimates of KL(pi || pi_ref) from the clamped log-ratio lr = log(pi / pi_ref) (Schulman 2020).
KL_REGISTRY: Registry[Callable[[jax.Array], jax.Array]] = Registry("KL estimator")
KL_REGISTRY.register("k1", lambda lr: lr)                                  # log(pi / pi_ref)
KL_REGISTRY.register("k2", lambda lr: 0.5 * jnp.square(lr))               # 0.5 log(pi / pi_ref)^2
KL_REGISTRY.register("k3", lambda lr: jnp.exp(-lr) - 1.0 + lr)            # unbiased, non-negative, low variance
KL_ESTIMATORS: tuple[str, ...] = KL_REGISTRY.names()


def kl_penalty(logp: jax.Array, ref_logp: jax.Array, estimator: str = "k3", clip: float = 20.0) -> jax.Array:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi by the registered ``estimator``
    (``KL_REGISTRY``): k1 = log(pi / pi_ref); k2 = 0.5 log(pi / pi_ref)^2; k3 = pi_ref/pi - 1 - log(pi_ref/pi).
    The log-ratio is clamped to +-``clip`` before exponentiating."""
    fn = KL_REGISTRY.lookup(estimator)
    return fn(jnp.clip(logp - ref_logp, -clip, clip))


def approx_kl(logp: jax.Array, old_logp: jax.Array) -> jax.Array:
    """Per-token k3 estimate of KL(pi_old || pi) (r - 1 - log r, r = pi / pi_old): the policy-drift diagnostic."""
    return kl_penalty(old_logp, logp, "k3")


# ----------------------------------------------------------------------------- total
def per_token_objective(
    logp: jax.Array,
    old_logp: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    dual_clip: float | None = None,
    log_ratio_clip: float | None = 20.0,
    ratio_level: str = "token",
    entropy: jax.Array | None = None,
    entropy_coef: float = 0.0,
    ref_logp: jax.Array | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Per-token total loss ``pg + kl_coef * kl - entropy_coef * entropy`` and per-token diagnostics.

    All inputs are [B, S]; ``advantages`` is broadcast per token and treated as a constant. The returned
    dict holds per-token ``pg``, ``kl`` (0 without a reference), ``approx_kl`` (old vs current), the clip
    flags and ``entropy`` (when given). Aggregate each with ``aggregate``/``aggregate_sum``.
    """
    advantages = jax.lax.stop_gradient(advantages)
    old_logp = jax.lax.stop_gradient(old_logp)
    lr = log_ratio(logp, old_logp, mask, ratio_level=ratio_level, log_ratio_clip=log_ratio_clip)
    pg, flags = clipped_surrogate(lr, advantages, eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip)
    total = pg
    stats = dict(flags, pg=pg, approx_kl=jax.lax.stop_gradient(approx_kl(logp, old_logp)))
    if ref_logp is not None:
        kl = kl_penalty(logp, jax.lax.stop_gradient(ref_logp), kl_estimator)
        total = total + kl_coef * kl
        stats["kl"] = kl
    else:
        if kl_coef != 0.0:
            raise ValueError("kl_coef is non-zero but no reference log-probabilities were given.")
        stats["kl"] = jnp.zeros_like(pg)
    if entropy is not None:
        if entropy_coef != 0.0:
            total = total - entropy_coef * entropy
        stats["entropy"] = entropy
    elif entropy_coef != 0.0:
        raise ValueError("entropy_coef is non-zero but no entropy was given.")
    return total, stats
