"""Independent float64 references for the advantage estimators, written from first principles.

Every Pass@k quantity is computed by enumerating k-subsets with itertools.combinations (no binomial
formulas, no sorting tricks), one prompt (a 1-D float64 vector of its valid rewards) at a time.
"""
from __future__ import annotations

import functools
import itertools
import math

import numpy as np

WIDTH = 10  # static width of the shared test batches: every n <= 10 is a masked row


def _pack(rows, rng):
    rewards = np.full((len(rows), WIDTH), np.nan, np.float32)
    mask = np.zeros((len(rows), WIDTH), bool)
    for i, vals in enumerate(rows):
        slots = np.sort(rng.choice(WIDTH, len(vals), replace=False))
        mask[i, slots] = True
        rewards[i, slots] = vals
        rewards[i, ~mask[i]] = np.where(rng.random(WIDTH - len(vals)) < 0.5, np.nan, 1e3)
    return rewards, mask


@functools.lru_cache(maxsize=None)
def standard_batches(seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(rewards f32[72, 10], mask bool[72, 10]) batches shared by the tests (one compilation per estimator):
    ``binary`` ({0, 1}: every n <= 10 with every N_pos = 0..n, plus 7 random rows), ``plus_minus`` (the same
    as {-1, +1}) and ``real`` (rounded normals with ties, constant 0.7 groups and some binary rows)."""
    rng = np.random.default_rng(seed)
    binary = [rng.permutation((np.arange(n) < c).astype(np.float32)) for n in range(1, WIDTH + 1)
              for c in range(n + 1)]
    binary += [(rng.random(rng.integers(1, WIDTH + 1)) < 0.5).astype(np.float32) for _ in range(7)]
    real = []
    for n in range(1, WIDTH + 1):
        real += [np.round(rng.normal(size=n), 1).astype(np.float32) for _ in range(4)]
        real.append(np.full(n, 0.7, np.float32))  # constant non-binary group: exactly zero advantage
        real.append(binary[rng.integers(len(binary))])  # binary rows inside a non-binary batch
    real += [rng.uniform(-2, 2, size=WIDTH).astype(np.float32) for _ in range(len(binary) - len(real))]
    return {"binary": _pack(binary, rng), "plus_minus": _pack([2 * b - 1 for b in binary], rng),
            "real": _pack(real, rng)}


def grpo(r, ddof=0, normalize=True):
    r = np.asarray(r, np.float64)
    if len(r) <= ddof or r.max() == r.min():
        return np.zeros_like(r)
    d = r - r.mean()
    return d / r.std(ddof=ddof) if normalize else d


def rloo(r):
    r = np.asarray(r, np.float64)
    n = len(r)
    if n < 2 or r.max() == r.min():
        return np.zeros_like(r)
    return np.array([r[i] - np.delete(r, i).mean() for i in range(n)])


def max_minus_second(r, normalize=False, ddof=1):
    r = np.asarray(r, np.float64)
    out = np.zeros_like(r)
    if len(r) < 2:
        return out
    i = int(np.argmax(r))
    gap = r[i] - np.max(np.delete(r, i))
    if normalize and gap > 0:
        gap /= r.std(ddof=ddof)
    out[i] = gap
    return out


def passk_analytic(r, k):
    """Mean over the k-subsets containing i of (max - mu) / sigma, mu/sigma over all subsets' maxima."""
    r = np.asarray(r, np.float64)
    n = len(r)
    if n < k:
        return np.zeros(n)
    subsets = list(itertools.combinations(range(n), k))
    maxima = np.array([r[list(s)].max() for s in subsets])
    sigma = maxima.std()
    if sigma == 0:
        return np.zeros(n)
    mu = maxima.mean()
    total, count = np.zeros(n), np.zeros(n)
    for s, m in zip(subsets, maxima):
        for i in s:
            total[i] += (m - mu) / sigma
            count[i] += 1
    return total / count


def passk_full(r, k, ddof=0):
    """Alg. 1: consecutive disjoint groups of k, leftovers 0, GRPO over the group maxima."""
    r = np.asarray(r, np.float64)
    g = len(r) // k
    out = np.zeros(len(r))
    if g == 0:
        return out
    adv = grpo(np.array([r[j * k:(j + 1) * k].max() for j in range(g)]), ddof=ddof)
    for j in range(g):
        out[j * k:(j + 1) * k] = adv[j]
    return out


def bootstrap_from_groups(r, groups, reduce="sum", ddof=0):
    """Alg. 2 given the groups (lists of indices): GRPO over group maxima, sum or mean per response."""
    r = np.asarray(r, np.float64)
    adv = grpo(np.array([r[list(g)].max() for g in groups]), ddof=ddof)
    total, count = np.zeros(len(r)), np.zeros(len(r))
    for g, a in zip(groups, adv):
        for i in g:
            total[i] += a
            count[i] += 1
    if reduce == "mean":
        return np.where(count > 0, total / np.maximum(count, 1), 0.0)
    return total


def _mean_max(r, k):
    """Average max over all k-subsets (max of the empty set = 0)."""
    if k == 0:
        return 0.0
    return float(np.mean([max(r[list(s)]) for s in itertools.combinations(range(len(r)), k)]))


def pkpo(r, k, baseline="sloo_minus_one"):
    """n * s_i with s_i = (1/C(n,k)) sum over k-subsets S containing i of [max S - baseline term]."""
    r = np.asarray(r, np.float64)
    n = len(r)
    if n < k or (baseline == "sloo" and n < k + 1):
        return np.zeros(n)
    out = np.zeros(n)
    for s in itertools.combinations(range(n), k):
        m = r[list(s)].max()
        for i in s:
            if baseline == "sloo_minus_one":
                rest = [j for j in s if j != i]
                out[i] += m - (r[rest].max() if rest else 0.0)
            else:
                out[i] += m
    out /= math.comb(n, k)
    if baseline == "sloo":
        out -= np.array([k / (n - 1) * _mean_max(np.delete(r, i), k) for i in range(n)])
    return n * out


def n_pos(r, threshold=0.5):
    return int(np.sum(np.asarray(r) >= threshold))


def combination(r, k, threshold=0.5):
    acc = n_pos(r, threshold) / len(r)
    return acc * passk_analytic(r, k) + (1 - acc) * grpo(r)


def exceed(r, k, a=4.0, b=10.0, base=math.e, threshold=0.5):
    f = a / (b * math.log(max(n_pos(r, threshold), 1) + 0.5, base))
    return f * passk_analytic(r, k)


def passk_conditional_sd(r, k):
    """Std, over the k-subsets containing i, of (max - mu) / sigma (the per-group spread that bootstrap
    sampling averages); zeros where sigma = 0."""
    r = np.asarray(r, np.float64)
    n = len(r)
    subsets = list(itertools.combinations(range(n), k))
    maxima = np.array([r[list(s)].max() for s in subsets])
    if maxima.std() == 0:
        return np.zeros(n)
    z = (maxima - maxima.mean()) / maxima.std()
    return np.array([np.std([zi for s, zi in zip(subsets, z) if i in s]) for i in range(n)])


def maxrl(r):
    """MaxRL (arXiv 2602.02710): (r - mean) / mean; 0 when mean <= 0 or the rewards are equal."""
    r = np.asarray(r, np.float64)
    mean = r.mean()
    if mean <= 0 or r.max() == r.min():
        return np.zeros_like(r)
    return (r - mean) / mean


def rs_grpo(r, beta):
    """RS-GRPO (arXiv 2509.24261): (1/beta) (exp(beta r) / mean exp(beta r) - 1), straight from the formula."""
    r = np.asarray(r, np.float64)
    if r.max() == r.min():
        return np.zeros_like(r)
    w = np.exp(beta * r)
    return (w / w.mean() - 1.0) / beta
