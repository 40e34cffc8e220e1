"""Statistics of the training study: paired differences over seeds, their intervals and the verdict rule.

Every seed trains every method from that seed's own warm start and evaluates it on the same held-out mazes
with the same evaluation key, so a claim "method a beats method b on metric m" is judged on the paired
per-seed differences d_s = m(a, s) - m(b, s):

* **seed interval**: mean(d) +- t_{0.975, S-1} * sd(d) / sqrt(S), the two-sided 95% t-interval over the S
  seeds (it covers warm-start, RL-sampling and evaluation-sampling variance);
* **maze interval**: the 2.5 / 97.5 percentiles of mean_s(mean over resampled mazes of a - b) under a
  bootstrap that resamples the held-out mazes (the same draw for every seed and both methods), covering
  the choice of test mazes. Metrics that are not averages over mazes (training entropy) have none.

Verdict (the rule pre-registered in ``DESIGN.md``): a *superiority* claim (a > b) is **reproduced** when
both intervals lie above 0, **contradicted** when both lie below 0, **inconclusive** otherwise. A
*non-inferiority* claim (a is not worse than b by more than ``margin``) is reproduced when both lower
bounds exceed -margin, contradicted when both upper bounds are below 0 (a significant cost that the margin
does not excuse), inconclusive otherwise.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np
from scipy import stats as scipy_stats

from passk_jax import metrics

LEVEL = 0.95


@dataclasses.dataclass(frozen=True)
class Interval:
    mean: float
    lo: float
    hi: float

    def excludes(self, value: float) -> int:
        """+1 if the interval lies above ``value``, -1 below, 0 if it contains it."""
        return 1 if self.lo > value else -1 if self.hi < value else 0


def t_interval(diffs: Sequence[float], level: float = LEVEL) -> Interval:
    """Two-sided t-interval of the mean of ``diffs`` (one value per seed; NaN bounds for one seed)."""
    d = np.asarray(diffs, np.float64)
    mean = float(d.mean())
    if len(d) < 2:
        return Interval(mean, float("nan"), float("nan"))
    half = float(scipy_stats.t.ppf(0.5 + level / 2, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d)))
    return Interval(mean, mean - half, mean + half)


def maze_bootstrap(a: np.ndarray, b: np.ndarray, *, draws: int = 2000, seed: int = 0,
                   level: float = LEVEL) -> Interval:
    """Percentile interval of mean_s mean_m (a - b)[s, m] when the mazes m are resampled with replacement
    (one draw shared by every seed s); ``a``, ``b``: float[S, M] per-seed per-maze values."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    d = a - b
    if d.ndim != 2:
        raise ValueError(f"maze_bootstrap needs [seeds, mazes] arrays, got shape {d.shape}.")
    rng = np.random.default_rng(seed)
    if np.isnan(a).any() or np.isnan(b).any():
        return _maze_bootstrap_nan(a, b, rng, draws, level)
    per_maze = d.mean(0)  # the seed mean commutes with the maze resampling
    idx = rng.integers(0, len(per_maze), size=(draws, len(per_maze)))
    boot = per_maze[idx].mean(1)
    tail = (1 - level) / 2 * 100
    return Interval(float(per_maze.mean()), float(np.percentile(boot, tail)),
                    float(np.percentile(boot, 100 - tail)))


def _maze_bootstrap_nan(a: np.ndarray, b: np.ndarray, rng: np.random.Generator, draws: int,
                        level: float) -> Interval:
    """``maze_bootstrap`` for metrics undefined on some mazes (NaN, e.g. the distinct share of wrong
    responses of a maze with none): each run's value is its mean over its defined mazes, in the data and in
    every resample (the same drawn mazes for every run), and the interval is of the seed-mean difference."""
    m = a.shape[1]
    idx = rng.integers(0, m, size=(draws, m))
    weights = np.zeros((draws, m))
    np.add.at(weights, (np.arange(draws)[:, None], idx), 1.0)

    def run_means(x: np.ndarray, w: np.ndarray) -> np.ndarray:  # [..., runs]
        ok = ~np.isnan(x)
        with np.errstate(invalid="ignore", divide="ignore"):
            return (w @ np.where(ok, x, 0.0).T) / (w @ ok.T.astype(np.float64))

    observed = float(np.mean(run_means(a, np.ones(m)) - run_means(b, np.ones(m))))
    boot = np.nanmean(run_means(a, weights) - run_means(b, weights), axis=1)
    boot = boot[~np.isnan(boot)]
    tail = (1 - level) / 2 * 100
    return Interval(observed, float(np.percentile(boot, tail)), float(np.percentile(boot, 100 - tail)))


def verdict(seed_ci: Interval, maze_ci: Interval | None, *, kind: str = "superiority",
            margin: float = 0.0) -> str:
    """The pre-registered rule (module docstring): "reproduced", "contradicted" or "inconclusive"."""
    cis = [seed_ci] + ([maze_ci] if maze_ci is not None else [])
    if any(math.isnan(c.lo) or math.isnan(c.hi) for c in cis):
        return "inconclusive"
    if kind == "superiority":
        sides = {c.excludes(0.0) for c in cis}
        return {frozenset({1}): "reproduced", frozenset({-1}): "contradicted"}.get(frozenset(sides),
                                                                                   "inconclusive")
    if kind == "noninferiority":
        if all(c.lo > -margin for c in cis):
            return "reproduced"
        if all(c.hi < 0.0 for c in cis):
            return "contradicted"
        return "inconclusive"
    raise ValueError(f"unknown claim kind {kind!r}; use 'superiority' or 'noninferiority'.")


def seeds_to_decide(diffs: Sequence[float], *, kind: str = "superiority", margin: float = 0.0,
                    level: float = LEVEL, max_seeds: int = 10_000) -> tuple[int | None, str]:
    """Planning, not a test: the fewest seeds at which the seed interval alone would reach a verdict if the
    per-seed differences kept their observed mean and sd (the projected interval mean +- t_{n-1} sd/sqrt(n)
    judged by ``verdict``); (None, "inconclusive") when no n <= ``max_seeds`` does (e.g. a zero mean). At
    that n the real interval decides only about half the time (its mean is not fixed): 80% power needs
    roughly twice the seeds."""
    d = np.asarray(diffs, np.float64)
    if len(d) < 2:
        return None, "inconclusive"
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    n = np.arange(2, max_seeds + 1)
    halves = scipy_stats.t.ppf(0.5 + level / 2, n - 1) * sd / np.sqrt(n)
    for size, half in zip(n, halves):
        v = verdict(Interval(mean, mean - half, mean + half), None, kind=kind, margin=margin)
        if v != "inconclusive":
            return int(size), v
    return None, "inconclusive"


def mazes_to_decide(ci: Interval, num_mazes: int, *, kind: str = "superiority", margin: float = 0.0,
                    max_mazes: int = 10_000_000) -> tuple[int | None, str]:
    """Planning, not a test: the fewest held-out mazes at which the maze interval alone would reach a
    verdict if its centre stayed at ``ci.mean`` and its half-width shrank like 1/sqrt(mazes) from the
    ``num_mazes`` it was computed on (the projected interval judged by ``verdict``, whose decided set only
    grows with the mazes, so a bisection finds the first); (None, "inconclusive") when no count up to
    ``max_mazes`` does (a zero mean)."""
    half = (ci.hi - ci.lo) / 2

    def judged(m: int) -> str:
        h = half * math.sqrt(num_mazes / m)
        return verdict(Interval(ci.mean, ci.mean - h, ci.mean + h), None, kind=kind, margin=margin)

    if judged(max_mazes) == "inconclusive":
        return None, "inconclusive"
    lo, hi = 1, max_mazes
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if judged(mid) != "inconclusive" else (mid + 1, hi)
    return lo, judged(lo)


def pass_at_k_per_maze(counts: np.ndarray, n: int, k: int) -> np.ndarray:
    """Unbiased pass@k of each maze from its number of correct samples out of ``n`` (``metrics.pass_at_k``,
    the estimator the evaluation reports)."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per maze, have {n}.")
    c = np.asarray(counts, np.int64)
    return np.asarray(metrics.pass_at_k(np.full_like(c, n), c, k), np.float64)


# ------------------------------------------------------------------ exploratory tests (not the verdict rule)
def t_test_p(diffs: Sequence[float], null: float = 0.0) -> float:
    """Two-sided p-value of the one-sample t-test of mean(``diffs``) = ``null`` (S - 1 degrees of freedom);
    p < 1 - level exactly when ``t_interval(diffs, level)`` excludes ``null``. NaN for one value; for
    identical values (sd 0) 0 if they differ from ``null`` (the interval is the point) and 1 if not."""
    d = np.asarray(diffs, np.float64) - null
    if len(d) < 2:
        return float("nan")
    if d.std(ddof=1) == 0:
        return 0.0 if d.mean() != 0 else 1.0
    t = d.mean() / (d.std(ddof=1) / math.sqrt(len(d)))
    return float(2 * scipy_stats.t.sf(abs(t), len(d) - 1))


def sign_flip_p(diffs: Sequence[float], null: float = 0.0, alternative: str = "two-sided") -> float:
    """Exact paired sign-flip (randomisation) p-value of mean(``diffs``) = ``null``: the share of the 2^S
    sign vectors s for which mean(s * (d - null)) is at least as extreme as the observed mean (``"two-sided"``:
    in absolute value; ``"greater"``: at least as large). Its floor is 1/2^S one-sided and 2/2^S two-sided
    (1/32 and 1/16 at 5 seeds), whatever the data. NaN if a difference is NaN. Beyond 16 values, 2^16
    random sign vectors (seeded) plus the observed one give the Monte Carlo p-value (1 + hits) / (1 + 2^16),
    which is valid but not exact."""
    d = np.asarray(diffs, np.float64) - null
    if d.ndim != 1 or len(d) < 1:
        raise ValueError(f"sign_flip_p needs a non-empty vector of differences, got shape {d.shape}.")
    if alternative not in ("two-sided", "greater"):
        raise ValueError(f"unknown alternative {alternative!r}; use 'two-sided' or 'greater'.")
    if np.isnan(d).any():
        return float("nan")
    exact = len(d) <= 16
    if exact:
        signs = 1 - 2 * ((np.arange(2 ** len(d))[:, None] >> np.arange(len(d))) & 1)
    else:
        signs = 1 - 2 * np.random.default_rng(0).integers(0, 2, size=(2 ** 16, len(d)))
    means = (signs * d).mean(1)
    obs, tol = d.mean(), 1e-12 * max(1.0, float(np.abs(d).max()))
    hits = np.abs(means) >= abs(obs) - tol if alternative == "two-sided" else means >= obs - tol
    return float(np.mean(hits)) if exact else float((1 + hits.sum()) / (1 + len(hits)))


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the input order: the j-th smallest of m p-values becomes
    max over i <= j of min(1, (m - i + 1) p_(i)); rejecting every adjusted p < alpha keeps the family-wise
    error rate at alpha. NaN p-values are left out of the family and stay NaN."""
    p = np.asarray(pvalues, np.float64)
    out = np.full(len(p), np.nan)
    idx = np.flatnonzero(~np.isnan(p))
    order = idx[np.argsort(p[idx], kind="stable")]
    m = len(order)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out.tolist()
