"""Advantage estimators of Pass@k Training (Chen et al., arXiv 2508.10751) and of the methods it compares to
(GRPO, RLOO, PKPO, max-minus-second).

Every estimator maps ``rewards f32[P, n]`` (P prompts, n rollouts each) and an optional ``mask bool[P, n]``
(valid rollouts) to advantages ``f32[P, n]``. Masked entries get exactly 0 and take no part in any group
statistic, so ``n`` below always means the per-prompt number of valid rollouts. Estimators are pure ``jnp``
(no Python loop over prompts, no host sync) and work under ``jax.jit`` / ``jax.vmap`` with ``k`` and the
options static (Python values). Each one checks its static arguments eagerly (``validate``) and runs its
body under ``jax.jit`` with ``k`` traced, so one compilation per shape serves every k. A prompt whose
(traced) mask leaves fewer than ``k`` valid rollouts (``k + 1`` for PKPO ``sloo``) gets all-zero advantages.

Numerics: float32 on device. Binomial ratios never come from a raw ``comb`` (overflow) or a float32
``gammaln`` (absolute error ~1e-3 near n = 4096): they are cumulative products of correctly rounded ratios of
small integers (sorted paths), a float64 host table (binary rewards, no mask), or error-free two-float
differences of a float64 log-factorial table (binary rewards with a mask). Zero-variance groups are detected
exactly, never by comparing a float residue with an epsilon. Rewards must be finite.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import numbers
import re
from typing import Any, Callable, Mapping

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from passk_jax.metrics import PASS_THRESHOLD, is_pass
from passk_jax.registry import Registry

Array = jax.Array
PKPO_BASELINES = ("none", "sloo", "sloo_minus_one")
MAX_ROLLOUTS = 46340  # n (n + 1) must fit in int32 (see _analytic)


@dataclasses.dataclass(frozen=True)
class Option:
    """One keyword option of an estimator: ``check(value) -> bool``, the ``rule`` sentence a bad value gets
    (after "option name=value ...") and what the option means (``doc``). The default is the signature's."""
    check: Callable[[Any], bool]
    rule: str
    doc: str


@dataclasses.dataclass(frozen=True)
class Estimator:
    """A registry entry: the public function, the first line of its docstring, its options (with their
    defaults), the check of its arguments against the group size, and which inputs ``compute`` supplies."""
    name: str
    fn: Callable[..., Array]
    summary: str
    options: Mapping[str, Option]
    defaults: Mapping[str, Any]
    check: Callable[[int, int, dict], str | None]  # (n, k, options with defaults) -> error sentence or None
    uses_k: bool
    needs_key: bool
    needs_entropy: bool


_REGISTRY: Registry[Estimator] = Registry("advantage estimator")


def _summary(doc: str) -> str:
    """The first sentence of a docstring's first paragraph, on one line."""
    paragraph = " ".join(inspect.cleandoc(doc).split("\n\n")[0].split())
    end = re.search(r"\.(?=\s+[A-Z`]|$)", paragraph)  # not "Eq. 18", "et al., 2025"
    return paragraph[:end.end()] if end else paragraph


def _no_check(n: int, k: int, options: dict) -> str | None:
    return None


def _estimator(options: Mapping[str, Option] | None = None, *, static: tuple[str, ...] = (), jit: bool = True,
               check: Callable[[int, int, dict], str | None] = _no_check):
    """Registers an estimator under its function name with its ``options`` and its ``check`` of n, k and the
    options. The public function validates them eagerly, then runs the body under ``jax.jit`` (``jit=False``:
    a body composed of other estimators, whose compilations it then shares). Only the ``static`` options
    (those that change shapes or branches) are compile-time constants; ``k`` and numeric options are traced,
    so one compilation per shape serves every value."""
    options = dict(options or {})

    def wrap(body):
        jitted = jax.jit(body, static_argnames=static) if jit else body
        signature = inspect.signature(body)
        params = signature.parameters
        missing = sorted(set(options) - set(params))
        assert not missing, f"{body.__name__}: options {missing} are not keyword parameters"

        @functools.wraps(body)
        def estimator(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            arg = bound.arguments
            validate(body.__name__, _width(arg["rewards"]), arg.get("k", 1), **{o: arg[o] for o in options})
            return jitted(*args, **kwargs)

        _REGISTRY.register(body.__name__, Estimator(
            body.__name__, estimator, _summary(body.__doc__ or ""), options,
            {o: params[o].default for o in options}, check, "k" in params, "key" in params, "entropy" in params))
        return estimator
    return wrap


def _finite(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def is_integer(v: Any) -> bool:
    """An integer value that is not a bool (config checks: ``True`` is not a count)."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _positive(doc: str) -> Option:
    return Option(lambda v: _finite(v) and v > 0, "must be a finite number > 0", doc)


DDOF = Option(lambda v: is_integer(v) and v in (0, 1), "must be 0 or 1",
              "0: population std (the paper's equations); 1: Bessel std (verl, the paper's Figure 2)")
TOL = Option(lambda v: _finite(v) and v >= 0, "must be a finite number >= 0",
             "a group whose valid rewards span max - min <= tol counts as flat (advantage exactly 0)")
THRESHOLD = Option(_finite, "must be a finite number",
                   "a reward passes when >= threshold (N_pos; metrics.is_pass)")


def _two_rollouts(n: int, k: int, options: dict) -> str | None:
    if n < 2:
        return f"needs at least 2 rollouts per prompt (leave-one-out), got n={n}."


def _ddof_rollouts(n: int, k: int, options: dict) -> str | None:
    if options.get("ddof") == 1 and n < 2:
        return f"ddof=1 needs at least 2 rollouts per prompt, got n={n}."


# ----------------------------------------------------------------------------------------------- helpers
def _width(rewards) -> int:
    shape = np.shape(rewards)
    if len(shape) != 2:
        raise ValueError(f"rewards must have shape [P, n], got {shape}.")
    return int(shape[1])


def _height(rewards) -> int:
    return int(np.shape(rewards)[0])


def _prepare(rewards, mask) -> tuple[Array, Array]:
    """Returns (rewards with masked entries set to 0, valid) as f32[P, n], bool[P, n]."""
    r = jnp.asarray(rewards, jnp.float32)
    valid = jnp.ones(r.shape, bool) if mask is None else jnp.asarray(mask, bool)
    chex.assert_equal_shape([r, valid])
    return jnp.where(valid, r, 0.0), valid


def _count(valid: Array) -> Array:
    return jnp.sum(valid, axis=1, dtype=jnp.int32)


def _lo_hi(r: Array, valid: Array) -> tuple[Array, Array]:
    return jnp.min(jnp.where(valid, r, jnp.inf), axis=1), jnp.max(jnp.where(valid, r, -jnp.inf), axis=1)


def _n_pos(r: Array, valid: Array, threshold: float) -> Array:
    return jnp.sum(valid & is_pass(r, threshold), axis=1, dtype=jnp.int32)


def _grpo(r: Array, valid: Array, ddof: int = 0, normalize: bool = True, tol: float = 0.0) -> Array:
    """Group normalisation shared by GRPO and by the group maxima of Alg. 1 and Alg. 2."""
    r = jnp.where(valid, r, 0.0)
    n = _count(valid)
    d = jnp.where(valid, r - (jnp.sum(r, axis=1) / jnp.maximum(n, 1))[:, None], 0.0)
    lo, hi = _lo_hi(r, valid)
    flat = (hi - lo <= tol) | (n <= ddof)  # exact: equal rewards never leave a residue
    if normalize:
        std = jnp.sqrt(jnp.sum(d * d, axis=1) / jnp.maximum(n - ddof, 1))
        flat = flat | (std == 0)  # only reachable if the squares underflow
        d = d / jnp.where(flat, 1.0, std)[:, None]
    return jnp.where(flat[:, None], 0.0, d)


def _sort_rows(r: Array, valid: Array):
    """Sorts each row ascending with masked slots first. Returns (sorted rewards, 1-based rank among the
    valid entries (<= 0 on masked slots), n, inverse permutation)."""
    p, n_max = r.shape
    iota = lax.broadcasted_iota(jnp.int32, (p, n_max), 1)
    _, sr, perm = lax.sort((valid.astype(jnp.int32), r, iota), dimension=1, num_keys=2)
    inv = lax.sort((perm, iota), dimension=1, num_keys=1)[1]
    n = _count(valid)
    return sr, iota - (n_max - n)[:, None] + 1, n, inv


def _top_ratio(rank: Array, top: Array, k) -> Array:
    """C(j-1, k-1) / C(top-1, k-1) at rank j for 1 <= j <= top (0 for j < k and on masked slots).

    Reverse cumulative product of C(j-1,k-1)/C(j,k-1) = (j-k+1)/j: every factor is a correctly rounded
    ratio of integers, so the relative error stays ~log2(n) ulp for any n and k (tail values underflow to 0
    only where they are negligible next to the top weight 1)."""
    j = rank.astype(jnp.float32)
    step = jnp.maximum(j - (k - 1), 0.0) / jnp.maximum(j, 1.0)
    step = jnp.where(rank >= top[:, None], 1.0, step)
    return lax.cumprod(jnp.where(rank >= 1, step, 0.0), axis=1, reverse=True)


def _unsort(values: Array, inv: Array, valid: Array) -> Array:
    return jnp.where(valid, jnp.take_along_axis(values, inv, axis=1), 0.0)


# ------------------------------------------------------------------------------------- Pass@1 baselines
@_estimator({"ddof": DDOF, "normalize": Option(lambda v: isinstance(v, bool), "must be a bool",
                                                "False: no division by the std (Dr.GRPO)"), "tol": TOL},
            static=("normalize",), check=_ddof_rollouts)
def grpo(rewards, mask=None, *, ddof: int = 0, normalize: bool = True, tol: float = 0.0) -> Array:
    """GRPO / Pass@1 advantage (Eq. 1-3): ``A_i = (R_i - mean R) / std R``.

    ``ddof=0`` is the population std printed in the paper; ``ddof=1`` is the Bessel std of verl (and of the
    paper's Figure 2). ``normalize=False`` drops the division (Dr.GRPO). A group whose valid rewards span
    ``max - min <= tol`` (default: exactly equal) gets exactly 0; no epsilon is added to the std."""
    r, valid = _prepare(rewards, mask)
    return _grpo(r, valid, ddof, normalize, tol)


@_estimator({"tol": TOL}, check=_two_rollouts)
def rloo(rewards, mask=None, *, tol: float = 0.0) -> Array:
    """REINFORCE leave-one-out: ``A_i = R_i - mean_{j != i} R_j = n / (n-1) (R_i - mean R)``. Groups with
    fewer than 2 valid rollouts or with ``max - min <= tol`` get exactly 0."""
    r, valid = _prepare(rewards, mask)
    n = _count(valid).astype(jnp.float32)[:, None]
    return _grpo(r, valid, 1, False, tol) * n / jnp.maximum(n - 1.0, 1.0)


@_estimator()
def maxrl(rewards, mask=None) -> Array:
    """MaxRL, maximum-likelihood RL (arXiv 2602.02710): ``A_i = (R_i - mean R) / mean R`` per prompt.

    For binary rewards mean R is the empirical pass rate p, and the mean of A_i grad log pi is the
    estimate of grad log p (the gradient of the log-likelihood of success) rather than of grad p as in
    Pass@1 training: a prompt solved once in n rollouts weighs n times more than with a plain baseline.
    Rewards are meant to be >= 0 (a success probability); a prompt with mean R <= 0 or equal valid rewards
    gets exactly 0."""
    r, valid = _prepare(rewards, mask)
    mean = jnp.sum(r, axis=1) / jnp.maximum(_count(valid), 1)
    ok = mean > 0
    return _grpo(r, valid, 0, False) / jnp.where(ok, mean, 1.0)[:, None] * ok[:, None]


@_estimator({"beta": Option(lambda v: _finite(v) and v != 0, "must be a finite number other than 0",
                            "risk parameter: > 0 risk-seeking (weighs rare successes up), < 0 risk-averse; "
                            "A -> R - mean R as beta -> 0")})
def rs_grpo(rewards, mask=None, *, beta: float = 2.0) -> Array:
    """RS-GRPO, risk-seeking policy optimisation (arXiv 2509.24261): ``A_i = (1/beta) (exp(beta R_i) /
    mean_j exp(beta R_j) - 1)`` per prompt.

    The exponential utility (1/beta) log mean exp(beta R) interpolates between the mean reward (beta -> 0)
    and the maximum (beta -> inf, the Pass@k limit). Evaluated without overflow or cancellation as
    ``(u_i - mean u) / (beta (1 + mean u))`` with ``u = expm1(beta (R - m))``, m the extreme valid reward
    on beta's side; equal valid rewards give exactly 0."""
    r, valid = _prepare(rewards, mask)
    lo, hi = _lo_hi(r, valid)
    m = jnp.where(beta > 0, hi, lo)
    m = jnp.where(jnp.isfinite(m), m, 0.0)  # a prompt without valid rollouts
    u = jnp.where(valid, jnp.expm1(beta * (r - m[:, None])), 0.0)
    u_mean = jnp.sum(u, axis=1) / jnp.maximum(_count(valid), 1)
    d = jnp.where(valid, u - u_mean[:, None], 0.0)
    flat = hi - lo <= 0
    return jnp.where(flat[:, None], 0.0, d / (beta * (1.0 + u_mean))[:, None])


@_estimator({"normalize": Option(lambda v: isinstance(v, bool), "must be a bool",
                                 "True: divide the gap by the group std"), "ddof": DDOF},
            static=("normalize",), check=_two_rollouts)
def max_minus_second(rewards, mask=None, *, normalize: bool = False, ddof: int = 1) -> Array:
    """Max-minus-second (Tang et al., 2025; verl's ``grpo_passk``; *not* Pass@k Training).

    Only the best valid response (lowest index among ties) gets ``r_max - r_second``; all others get 0.
    ``normalize=True`` divides by the group std (``ddof=1`` as in verl, no epsilon: the std is positive
    whenever the advantage is)."""
    r, valid = _prepare(rewards, mask)
    masked = jnp.where(valid, r, -jnp.inf)
    is_top = jnp.arange(r.shape[1])[None, :] == jnp.argmax(masked, axis=1)[:, None]
    second = jnp.max(jnp.where(is_top, -jnp.inf, masked), axis=1)
    gap = jnp.where(_count(valid) >= 2, jnp.max(masked, axis=1) - second, 0.0)
    if normalize:
        d = _grpo(r, valid, 0, False)  # centred rewards (0 on flat groups, whose gap is 0 anyway)
        std = jnp.sqrt(jnp.sum(d * d, axis=1) / jnp.maximum(_count(valid) - ddof, 1))
        gap = jnp.where(gap > 0, gap / jnp.where(std > 0, std, 1.0), 0.0)
    return jnp.where(is_top & valid, gap[:, None], 0.0)


# ------------------------------------------------------------------------------ Pass@k: analytical form
@_estimator(jit=False)
def passk_analytic(rewards, k: int, mask=None) -> Array:
    """Analytical Pass@k advantage (Alg. 3, Eq. 11-15), exact for real-valued rewards as well.

    Defined as the mean, over all k-subsets S that contain response i, of ``(max R_S - mu) / sigma``, where
    mu and sigma are the mean and population std of ``max R_S`` over all C(n, k) subsets. For binary rewards
    this is the paper's closed form (Eq. 11-15): ``Rbar = 1 - C(N_neg, k)/C(N, k)``, ``sigma = sqrt(Rbar (1 -
    Rbar))``, ``A_pos = (1 - Rbar)/sigma``, ``A_neg = (1 - Rbar - C(N_neg-1, k-1)/C(N-1, k-1))/sigma``. With
    k = 1 it is GRPO with the population std.

    Paths, chosen on device (``lax.cond`` + ``where``; no host sync, no recompilation): a batch of {0, 1}
    rewards takes the O(P n) closed form; otherwise prompts with two distinct valid rewards still take the
    closed form (the advantage is invariant to ``R -> a R + b``, a > 0, so {-1, 1} qualifies) and the others
    the O(P n log n) sorted path. sigma = 0 gives exactly 0; it happens iff the valid rewards at ascending
    ranks k..n (the only ranks a subset maximum can occupy) are all equal, i.e. for binary rewards iff
    N_pos = 0 or N_neg < k (which includes k = n with N_pos >= 1)."""
    table = None if mask is not None else _binary_table(_width(rewards), k)
    return _passk_analytic(rewards, mask, k, table)


@jax.jit
def _passk_analytic(rewards, mask, k, table) -> Array:
    r, valid = _prepare(rewards, mask)
    # One fused row pass: code = N_pos + (n + 1) * #(rewards outside {0, 1}), exact in int32 for n <= 46340.
    marker = r.shape[1] + 1
    code = jnp.sum(jnp.where(valid & (r != 0.0), jnp.where(r == 1.0, 1, marker), 0), axis=1, dtype=jnp.int32)
    closed = lambda: _select(r == 1.0, valid, _binary_rows(code, valid, k, table))  # noqa: E731
    all_zero_one = jnp.max(code, initial=0) < marker
    return lax.cond(all_zero_one, closed, lambda: _analytic_other(r, valid, k, table))


def _analytic_other(r: Array, valid: Array, k, table) -> Array:
    lo, hi = _lo_hi(r, valid)
    pos = valid & (r == hi[:, None])
    binary = jnp.all(~valid | pos | (r == lo[:, None]), axis=1)
    closed = _select(pos, valid, _binary_rows(_count(pos), valid, k, table))
    general = lambda: jnp.where(binary[:, None], closed, _analytic_sorted(r, valid, k))  # noqa: E731
    return lax.cond(jnp.all(binary), lambda: closed, general)


def _binary_rows(n_pos: Array, valid: Array, k, table) -> Array:
    """f32[P, 2]: (A_pos, A_neg) per prompt, from the host table when there is no mask (every prompt has n
    valid rollouts), else from each prompt's valid count on device."""
    if table is not None:
        return table[jnp.minimum(n_pos, valid.shape[1])]
    return _binary_pair(_count(valid), n_pos, k, valid.shape[1])


@functools.lru_cache(maxsize=256)
def _binary_table(n: int, k: int) -> np.ndarray:
    """f32[n + 1, 2]: (A_pos, A_neg) of Eq. 11-15 for N_pos = 0..n, in float64 on the host (0 where sigma =
    0). With q = 1 - Rbar = C(N_neg, k)/C(N, k): A_pos = sqrt(q / (1 - q)) and, as C(N_neg-1, k-1)/C(N-1,
    k-1) = q N / N_neg, A_neg = -(N_pos / N_neg) A_pos; log q from lgamma (absolute error ~1e-12)."""
    out = np.zeros((n + 1, 2))
    log_c = lambda a: math.lgamma(a + 1) - math.lgamma(a - k + 1)  # noqa: E731  (log C(a, k) + log k!)
    for n_pos in range(1, n - k + 1):  # N_pos = 0 or N_neg < k: sigma = 0
        log_q = log_c(n - n_pos) - log_c(n)
        a_pos = math.sqrt(math.exp(log_q) / -math.expm1(log_q))
        out[n_pos] = a_pos, -a_pos * n_pos / (n - n_pos)
    return out.astype(np.float32)


@functools.lru_cache(maxsize=32)
def _log_factorial(n_max: int) -> tuple[np.ndarray, np.ndarray]:
    """log(x!) for x = 0..n_max from float64 lgamma, as float32 (hi, lo) pairs (~48 significant bits)."""
    log_f = np.array([math.lgamma(x + 1.0) for x in range(n_max + 1)])
    hi = log_f.astype(np.float32)
    return hi, (log_f - hi).astype(np.float32)


def _two_sum(a: Array, b: Array) -> tuple[Array, Array]:
    """Knuth's error-free sum: a + b == s + e exactly."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def _binary_pair(n: Array, n_pos: Array, k, n_max: int) -> Array:
    """The same (A_pos, A_neg) on device for per-prompt valid counts n (masked batches), f32[P, 2]:
    log q = [log N_neg! - log N!] - [log (N_neg-k)! - log (N-k)!] in two-float arithmetic from a host
    log-factorial table, so its absolute error is ~1e-11 although the entries reach ~3e4 at n = 4096, and
    Rbar = -expm1(log q) stays accurate even when tiny."""
    n_neg = n - n_pos
    hi, lo = (jnp.asarray(t) for t in _log_factorial(n_max))

    def log_ratio(a, b):  # log(a! / b!) as an unevaluated pair
        a, b = jnp.maximum(a, 0), jnp.maximum(b, 0)
        s, e = _two_sum(hi[a], -hi[b])
        return s, e + (lo[a] - lo[b])

    (s1, e1), (s2, e2) = log_ratio(n_neg, n), log_ratio(n_neg - k, n - k)
    s, e = _two_sum(s1, -s2)
    flat = (n_pos == 0) | (n_neg < k)  # sigma = 0 exactly: no subset passes, or none fails
    log_q = jnp.where(flat, -1.0, s + (e + (e1 - e2)))
    a_pos = jnp.exp(0.5 * (log_q - jnp.log(-jnp.expm1(log_q))))
    a_neg = -a_pos * n_pos / jnp.maximum(n_neg, 1)
    return jnp.where(flat[:, None], 0.0, jnp.stack([a_pos, a_neg], axis=1))


def _select(pos: Array, valid: Array, rows: Array) -> Array:
    return jnp.where(valid, jnp.where(pos, rows[:, :1], rows[:, 1:]), 0.0)


def _analytic_sorted(r: Array, valid: Array, k) -> Array:
    """General path. With valid rewards sorted ascending r_1 <= ... <= r_n, the subset maximum sits at rank
    j with probability C(j-1, k-1)/C(n, k), and the mean maximum over the subsets containing rank j is
    ``[C(j-1, k-1) r_j + sum_{m>j} C(m-2, k-2) r_m] / C(n-1, k-1)`` (ties give equal values, so the
    tie-break is irrelevant). Both use a_j = C(j-1, k-1)/C(n-1, k-1) and C(m-2, k-2)/C(n-1, k-1) = a_m
    (k-1)/(m-1). Rewards are centred on mu before the suffix sum, so the result carries no cancellation."""
    sr, rank, n, inv = _sort_rows(r, valid)
    a = _top_ratio(rank, n, k)
    w = a / jnp.maximum(jnp.sum(a, axis=1, keepdims=True), 1e-30)
    d = sr - jnp.sum(w * sr, axis=1, keepdims=True)
    d = d - jnp.sum(w * d, axis=1, keepdims=True)  # second pass removes the rounding of mu
    sigma = jnp.sqrt(jnp.sum(w * d * d, axis=1))
    b = a * (k - 1) / jnp.maximum(rank - 1, 1).astype(jnp.float32)
    e = a * d + lax.cumsum(b * d, axis=1, reverse=True) - b * d
    kth = jnp.take_along_axis(sr, jnp.clip(r.shape[1] - n + k - 1, 0, r.shape[1] - 1)[:, None], axis=1)
    flat = (n < k) | (kth[:, 0] == sr[:, -1]) | (sigma == 0)
    return _unsort(jnp.where(flat[:, None], 0.0, e / jnp.where(flat, 1.0, sigma)[:, None]), inv, valid)


# ------------------------------------------------------------------------ Pass@k: sampled group variants
def _full_groups(n: int, k: int, options: dict) -> str | None:
    if n < 2 * k:
        return f"full sampling needs at least two groups, but n={n} < 2k={2 * k}."


@_estimator({"ddof": DDOF}, check=_full_groups)
def passk_full(rewards, k: int, mask=None, *, ddof: int = 0) -> Array:
    """Full sampling (Alg. 1): the valid rollouts, in their original order, form floor(n/k) disjoint
    consecutive groups of k (leftovers get 0). Group reward = max of its members (Eq. 5); group rewards are
    GRPO-normalised across the groups (population std by default) and every member gets its group's value.
    Fewer than two groups, or equal group maxima, give exactly 0."""
    r, valid = _prepare(rewards, mask)
    p, n_max = r.shape
    iota = lax.broadcasted_iota(jnp.int32, (p, n_max), 1)
    order = lax.sort((1 - valid.astype(jnp.int32), iota), dimension=1, num_keys=1)[1]  # stable: valid first
    inv = lax.sort((order, iota), dimension=1, num_keys=1)[1]
    n_groups = (_count(valid) // k)[:, None]
    group = iota // k  # group of each slot of the compacted row
    member = group < n_groups
    values = jnp.where(member, jnp.take_along_axis(r, order, axis=1), -jnp.inf)
    segments = (jnp.arange(p)[:, None] * n_max + group).ravel()
    group_max = jax.ops.segment_max(values.ravel(), segments, num_segments=p * n_max).reshape(p, n_max)
    adv = _grpo(group_max, iota < n_groups, ddof)  # row g of group_max is group g
    return _unsort(jnp.where(member, jnp.take_along_axis(adv, group, axis=1), 0.0), inv, valid)


@functools.partial(jax.jit, static_argnames="num_groups")
def bootstrap_groups(key: Array, valid: Array, k, num_groups: int) -> Array:
    """Membership ``bool[P, num_groups, n]`` of Alg. 2's groups: each group is k distinct valid indices drawn
    uniformly, groups independent. Uniform 32-bit keys are sorted with masked slots last; ties (probability
    ~n^2 / 2^33 per group) are broken by index."""
    valid = jnp.asarray(valid, bool)
    shape = (valid.shape[0], num_groups, valid.shape[1])
    bits = jax.random.bits(key, shape, jnp.uint32)
    iota = lax.broadcasted_iota(jnp.int32, shape, 2)
    masked = jnp.broadcast_to(~valid[:, None, :], shape).astype(jnp.int32)
    order = lax.sort((masked, bits, iota), dimension=2, num_keys=2)[2]
    rank = lax.sort((order, iota), dimension=2, num_keys=1)[1]
    return (rank < k) & valid[:, None, :]


@_estimator({"num_groups": Option(lambda v: v is None or (is_integer(v) and v >= 1), "must be None or an integer >= 1",
                                  "groups drawn per prompt (None: n, as in the paper)"),
             "reduce": Option(lambda v: v in ("sum", "mean"), "must be 'sum' or 'mean'",
                              "'sum' over a response's groups (Eq. 6) or their 'mean'"),
             "ddof": DDOF}, jit=False, check=_ddof_rollouts)
def passk_bootstrap(key: Array, rewards, k: int, mask=None, *, num_groups: int | None = None,
                    reduce: str = "sum", ddof: int = 0) -> Array:
    """Bootstrap sampling (Alg. 2): ``num_groups`` (default n, as in the paper) independent groups of k
    distinct valid rollouts; group reward = max (Eq. 5), GRPO-normalised across the groups (population std by
    default). ``reduce="sum"`` gives each response the sum of the advantages of the groups containing it
    (Eq. 6; ~k times the analytical value when num_groups = n); ``reduce="mean"`` averages over those groups
    and converges to ``passk_analytic`` as num_groups grows. Responses in no group get 0. Memory O(P
    num_groups n)."""
    valid = jnp.ones(np.shape(rewards), bool) if mask is None else mask
    members = bootstrap_groups(key, valid, k, _width(rewards) if num_groups is None else num_groups)
    return _bootstrap_advantages(rewards, valid, members, k, ddof, reduce=reduce)


@functools.partial(jax.jit, static_argnames="reduce")
def _bootstrap_advantages(rewards, mask, members, k, ddof, reduce) -> Array:
    r, valid = _prepare(rewards, mask)
    group_max = jnp.max(jnp.where(members, r[:, None, :], -jnp.inf), axis=2)
    enough = jnp.broadcast_to((_count(valid) >= k)[:, None], group_max.shape)
    weight = members.astype(jnp.float32)
    adv = jnp.sum(weight * _grpo(group_max, enough, ddof)[:, :, None], axis=1)
    if reduce == "mean":
        adv = adv / jnp.maximum(jnp.sum(weight, axis=1), 1.0)
    return jnp.where(valid, adv, 0.0)


# --------------------------------------------------------------------- Pass@k: transfer and reward design
@jax.jit
def _accuracy(rewards, mask, threshold) -> Array:
    """N_pos / n per prompt as f32[P, 1], N_pos counting valid rewards >= threshold."""
    r, valid = _prepare(rewards, mask)
    return (_n_pos(r, valid, threshold) / jnp.maximum(_count(valid), 1))[:, None]


@_estimator({"threshold": THRESHOLD}, jit=False)
def combination(rewards, k: int, mask=None, *, threshold: float = PASS_THRESHOLD) -> Array:
    """Combination (Eq. 18): ``A = (N_pos/N) A_pass@k + (1 - N_pos/N) A_pass@1`` with the analytical Pass@k
    advantage and GRPO (population std). N_pos counts the valid rewards that pass (``metrics.is_pass``:
    ``>= threshold``; 0/1 and -1/1 rewards work with the default 0.5)."""
    acc = _accuracy(rewards, mask, threshold)
    return acc * passk_analytic(rewards, k, mask) + (1.0 - acc) * grpo(rewards, mask)


@jax.jit
def _exceed_factor(rewards, mask, a, b, base, threshold) -> Array:
    r, valid = _prepare(rewards, mask)
    n_pos = jnp.maximum(_n_pos(r, valid, threshold), 1).astype(jnp.float32)
    return (a * jnp.log(base) / (b * jnp.log(n_pos + 0.5)))[:, None]


@_estimator({"a": _positive("numerator of f = a / (b log_base(N_pos + 0.5))"),
             "b": _positive("factor of the logarithm in f"),
             "base": Option(lambda v: _finite(v) and v > 0 and v != 1, "must be a finite number > 0 other than 1",
                            "base of the logarithm in f"),
             "threshold": THRESHOLD}, jit=False)
def exceed(rewards, k: int, mask=None, *, a: float = 4.0, b: float = 10.0, base: float = math.e,
           threshold: float = PASS_THRESHOLD) -> Array:
    """Exceeding Pass@k (Eq. 17): ``A' = f(N_pos) A_pass@k`` with ``f = a / (b log_base(N_pos + 0.5))``.

    The extracted formula reads ``4 / 10log(N_pos + 0.5)``, which is ambiguous (10 ln, log10, ...). Every
    reading equals ``c / ln(N_pos + 0.5)`` with ``c = a ln(base) / b``: the shape (hard prompts weigh more,
    the peak of eta moves to N_pos = 1) is the same, only the global scale differs. The default (c = 0.4)
    keeps f(1) = 0.99; ``a=4, b=1, base=10`` gives the log10 reading (c = 9.2). N_pos counts the valid rewards
    that pass (``metrics.is_pass``); N_pos = 0 would make log(0.5) < 0 flip the sign, so f(0) := f(1)
    (binary prompts with N_pos = 0 have zero advantage anyway)."""
    return _exceed_factor(rewards, mask, a, b, base, threshold) * passk_analytic(rewards, k, mask)


@jax.jit
def _most_entropic(entropy, fraction) -> Array:
    """bool[P, 1]: the floor(fraction P + 0.5) prompts of highest entropy, ties to the lower index."""
    iota = jnp.arange(entropy.shape[0])
    order = lax.sort((-jnp.asarray(entropy, jnp.float32), iota), num_keys=1)[1]
    return (lax.sort((order, iota), num_keys=1)[1] < jnp.floor(fraction * entropy.shape[0] + 0.5))[:, None]


@_estimator({"fraction": Option(lambda v: _finite(v) and 0 <= v <= 1, "must be a number in [0, 1]",
                                "share of prompts (highest entropy first) that use Pass@1")}, jit=False)
def entropy_adaptive(rewards, entropy, k: int, mask=None, *, fraction: float = 0.5) -> Array:
    """Entropy-adaptive transfer (the paper's adaptation by policy entropy): the ``floor(fraction * P +
    0.5)`` prompts with the highest mean entropy ``entropy f32[P]`` (ties: lower index first) use the Pass@1
    advantage (GRPO, population std), the others the analytical Pass@k advantage."""
    chex.assert_shape(entropy, (_height(rewards),))
    return jnp.where(_most_entropic(entropy, fraction), grpo(rewards, mask), passk_analytic(rewards, k, mask))


# ------------------------------------------------------------------------------------------------- PKPO
def _pkpo_rollouts(n: int, k: int, options: dict) -> str | None:
    if options.get("baseline") == "sloo" and n < k + 1:
        return f"baseline 'sloo' needs n >= k + 1 rollouts, got n={n}, k={k}."


@_estimator({"baseline": Option(lambda v: v in PKPO_BASELINES, f"must be one of {PKPO_BASELINES}",
                                "'none', 'sloo' or 'sloo_minus_one' (their Eq. 19, 29, 33)")},
            static=("baseline",), check=_pkpo_rollouts)
def pkpo(rewards, k: int, mask=None, *, baseline: str = "sloo_minus_one") -> Array:
    """PKPO reward transformation (Walder & Karkhanis, 2025), binary and real-valued rewards.

    With s_i = (1/C(n,k)) sum_{|S|=k, S contains i} max R_S (their Eq. 19, the unbiased maxg@k gradient
    weight) and rho_K^(-i) the unbiased max@K estimate from the n-1 other rollouts (their Eq. 12):
      ``none``            s_i
      ``sloo``            s_i - k/(n-1) rho_k^(-i)   (= s_i - mean_{j != i} s_j^(-i), their Eq. 29)
      ``sloo_minus_one``  s_i - k/n rho_{k-1}^(-i) = (1/C(n,k)) sum_{S contains i} [max R_S - max R_{S-i}]
                          (their Eq. 33, recommended; max of the empty set := 0, so k = 1 gives R_i).
    The result is returned times n (the valid count), so that a per-response *mean* of A_i grad log pi, as
    the trainer's loss computes, is the unbiased estimate of grad maxg@k (the paper's listing returns s_i).
    These advantages are not centred (``sloo_minus_one`` is >= 0); equal rewards give exactly 0 for
    ``sloo_minus_one`` with k >= 2. ``sloo`` needs n >= k + 1."""
    r, valid = _prepare(rewards, mask)
    sr, rank, n, inv = _sort_rows(r, valid)
    a = _top_ratio(rank, n, k)
    b = a * (k - 1) / jnp.maximum(rank - 1, 1).astype(jnp.float32)
    e = a * sr + lax.cumsum(b * sr, axis=1, reverse=True) - b * sr  # mean max over subsets containing i
    nf = n.astype(jnp.float32)[:, None]
    if baseline == "none":
        out, flat = k * e, n < k
    elif baseline == "sloo":
        out, flat = k * e - k * nf / jnp.maximum(nf - 1.0, 1.0) * _loo_rho(sr, rank, n, k), n < k + 1
    else:
        lowest = jnp.take_along_axis(sr, jnp.clip(r.shape[1] - n, 0, r.shape[1] - 1)[:, None], axis=1)[:, 0]
        out, flat = k * (e - _loo_rho(sr, rank, n, k - 1)), (n < k) | ((lowest == sr[:, -1]) & (k > 1))
    return _unsort(jnp.where(flat[:, None], 0.0, out), inv, valid)


def _loo_rho(sr: Array, rank: Array, n: Array, kk) -> Array:
    """Unbiased max@kk estimate from the n-1 rollouts other than the one at each rank j (0 for kk = 0):
    ``sum_{m<j} v_m r_m + sum_{m>j} v_{m-1} r_m`` with v_t = C(t-1, kk-1)/C(n-1, kk), t = rank among n-1."""
    v = _top_ratio(rank, n - 1, kk) * kk / jnp.maximum(n - 1, 1).astype(jnp.float32)[:, None]
    v = jnp.where(rank <= (n - 1)[:, None], v, 0.0)
    below = lax.cumsum(v * sr, axis=1) - v * sr
    v_up = jnp.pad(v[:, :-1], ((0, 0), (1, 0)))  # weight of rank m-1, applied to r_m
    return below + lax.cumsum(v_up * sr, axis=1, reverse=True) - v_up * sr


# ------------------------------------------------------------------------------- registry and validation
def names() -> tuple[str, ...]:
    """Sorted names of the registered estimators."""
    return _REGISTRY.names()


def entry(name: str) -> Estimator:
    """The registry entry of ``name`` (ValueError listing the valid names otherwise)."""
    return _REGISTRY.lookup(name)


def get(name: str) -> Callable[..., Array]:
    """The estimator function registered under ``name``."""
    return entry(name).fn


def describe() -> str:
    """A Markdown table of every estimator: name, whether it takes k, its options with their defaults, and the
    first line of its docstring (the README's table is this output)."""
    rows = ["| name | k | options (default) | what it is |", "|---|---|---|---|"]
    for name in names():
        e = entry(name)
        opts = ", ".join(f"`{o}={e.defaults[o]!r}`" for o in e.options) or "none"
        rows.append(f"| `{name}` | {'yes' if e.uses_k else 'no'} | {opts} | {e.summary} |")
    return "\n".join(rows) + "\n"


def _check_option_names(name: str, options: dict) -> None:
    allowed = entry(name).options
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        allowed = ", ".join(allowed) or "none"
        raise ValueError(f"{name}: unknown option {unknown[0]!r}; its options are: {allowed}.")


def validate(name: str, n: int, k: int = 1, **options) -> None:
    """Eager, config-time checks of an estimator's static arguments; raises ValueError with one sentence.

    ``n`` is the number of rollouts per prompt (the static width of ``rewards``). The checks common to all
    estimators (n, k) are here; each option's rule and each estimator's own constraint on n and k come with
    its registry entry. Estimators run these checks themselves at call (trace) time on the static width; a
    traced mask that leaves a prompt with too few valid rollouts is not an error: that prompt gets all-zero
    advantages."""
    e = entry(name)
    _check_option_names(name, options)
    if not is_integer(n) or n < 1:
        raise ValueError(f"{name}: the number of rollouts per prompt n must be an integer >= 1, got {n!r}.")
    if n > MAX_ROLLOUTS:
        raise ValueError(f"{name}: n={n} rollouts per prompt exceeds the supported maximum {MAX_ROLLOUTS}.")
    if not is_integer(k) or k < 1:
        raise ValueError(f"{name}: k must be a (static) integer >= 1, got {k!r}.")
    if k > n:
        raise ValueError(f"{name}: k={k} exceeds the number of rollouts per prompt n={n}.")
    for opt, value in options.items():
        if not e.options[opt].check(value):
            raise ValueError(f"{name}: option {opt}={value!r} {e.options[opt].rule}.")
    problem = e.check(n, k, {**e.defaults, **options})
    if problem:
        raise ValueError(f"{name}: {problem}")


def compute(name: str, rewards, mask=None, *, k: int = 1, key: Array | None = None, entropy=None,
            **options) -> Array:
    """Uniform entry point: dispatches to the estimator ``name`` (see ``names()``) and returns f32[P, n].

    ``key`` is required by ``passk_bootstrap`` and ``entropy f32[P]`` by ``entropy_adaptive``; inputs an
    estimator does not use (including ``k``) are ignored. ``options`` are the estimator's keyword options."""
    e = entry(name)
    _check_option_names(name, options)
    kwargs = dict(options, rewards=rewards, mask=mask)
    if e.uses_k:
        kwargs["k"] = k
    if e.needs_key:
        if key is None:
            raise ValueError(f"{name} samples groups at random and needs a PRNG key: pass key=...")
        kwargs["key"] = key
    if e.needs_entropy:
        if entropy is None:
            raise ValueError(f"{name} ranks prompts by mean entropy and needs entropy=f32[P].")
        kwargs["entropy"] = entropy
    return e.fn(**kwargs)


# ------------------------------------------------------------------------------------------ diagnostics
def eta(n: int, k: int, estimator: str | Callable[[Array], Array] = "passk_analytic",
        **options) -> np.ndarray:
    """The paper's Section 4 diagnostic: ``eta(N_pos) = N_pos |A_pos| + N_neg |A_neg|`` for N_pos = 0..n.

    Evaluated with the actual estimator on binary rewards (one prompt per N_pos, as the sum of |A_i|): a
    registry name (``options`` and e.g. ``key=`` are passed to ``compute``) or a callable
    ``rewards f32[P, n] -> f32[P, n]``. Returns f64[n + 1]."""
    rewards = (np.arange(n)[None, :] < np.arange(n + 1)[:, None]).astype(np.float32)
    if callable(estimator):
        adv = estimator(jnp.asarray(rewards))
    else:
        adv = compute(estimator, rewards, k=k, **options)
    return np.abs(np.asarray(adv, np.float64)).sum(axis=1)
