"""Evaluation metrics: what counts as a pass, the unbiased pass@k and pass^k estimators and pass@k curves.
(The paper's eta diagnostic of the estimators is ``advantages.eta``.)"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Array = jax.Array

PASS_THRESHOLD = 0.5
"""A response passes when its reward is ``>= PASS_THRESHOLD`` (``is_pass``): 1 of 0/1 rewards and of -1/1
rewards, and N_pos of the paper (``docs/paper.md``)."""


def is_pass(rewards, threshold: float = PASS_THRESHOLD):
    """``rewards >= threshold`` elementwise, on NumPy or JAX arrays (traceable): the one definition of a
    pass used by the advantage estimators (N_pos), the step's ``rollout_pass@k`` and held-out evaluation."""
    return rewards >= threshold


def pass_at_k(n, c, k) -> Array:
    """Unbiased pass@k (Chen et al., 2021; Rbar of the paper's Eq. 11-15): ``1 - C(n-c, k) / C(n, k)``, over
    the elementwise-broadcast integer arrays ``n`` (samples), ``c`` (correct samples), ``k``.

    Stable product form: ``C(n-c, k)/C(n, k) = prod_{t < min(k, c)} (1 - max(k, c) / (n - t))``; the logs of
    the factors are summed with Kahan compensation and ``1 - exp(.)`` is taken with ``expm1``, so the float32
    result is accurate to a few ulp for any n (no ``comb`` overflow past n ~ 1030). ``n - c < k`` gives
    exactly 1. Invalid entries (k < 1, k > n, c < 0, c > n) raise ValueError when the inputs are concrete and
    give NaN under ``jit``."""
    n, c, k = jnp.broadcast_arrays(*(jnp.asarray(x, jnp.int32) for x in (n, c, k)))
    _check_counts("pass_at_k", n, c, k)
    return _pass_at_k(n, c, k)


def _check_counts(name: str, n, c, k) -> None:
    """One sentence naming the first invalid entry, when the inputs are concrete (traced ones give NaN)."""
    if not any(isinstance(x, jax.core.Tracer) for x in (n, c, k)):
        for bad, what in (((k < 1) | (k > n), "k must satisfy 1 <= k <= n"),
                          ((c < 0) | (c > n), "c must satisfy 0 <= c <= n")):
            if np.any(np.asarray(bad)):
                i = np.unravel_index(int(np.argmax(np.asarray(bad))), bad.shape)
                raise ValueError(f"{name}: {what}, got n={int(n[i])}, c={int(c[i])}, k={int(k[i])}.")


def _log_product(count: Array, log_factor) -> Array:
    """``sum_{t < count} log_factor(t)`` elementwise (the log of the product forms below), summed with Kahan
    compensation; ``log_factor(t)`` is only read where ``t < count``."""
    def body(t, carry):
        total, comp = carry
        y = jnp.where(t < count, log_factor(t), 0.0) - comp
        new = total + y
        return new, (new - total) - y

    zeros = jnp.zeros(count.shape, jnp.float32)
    return lax.fori_loop(0, jnp.max(count, initial=0), body, (zeros, zeros))[0]


def _invalid(n: Array, c: Array, k: Array) -> Array:
    return (k < 1) | (k > n) | (c < 0) | (c > n)


@jax.jit
def _pass_at_k(n: Array, c: Array, k: Array) -> Array:
    certain = n - c < k
    big = jnp.maximum(k, c).astype(jnp.float32)
    nf = n.astype(jnp.float32)
    log_q = _log_product(jnp.where(certain, 0, jnp.minimum(k, c)),
                         lambda t: jnp.log1p(-big / jnp.maximum(nf - t, 1.0)))
    out = jnp.where(certain, 1.0, 0.0 - jnp.expm1(log_q))  # 0.0 - : no -0.0 for c = 0
    return jnp.where(_invalid(n, c, k), jnp.nan, out)


def pass_hat_k(n, c, k) -> Array:
    """Unbiased pass^k, the probability that k samples drawn without replacement are *all* correct: ``C(c, k)
    / C(n, k)`` over the elementwise-broadcast integer arrays ``n``, ``c``, ``k`` (the reliability
    counterpart of pass@k; tau-bench's pass^k). Same stable product form as ``pass_at_k``: ``prod_{t < k}
    (c - t) / (n - t)`` summed in logs with Kahan compensation; ``c < k`` gives exactly 0 and ``c = n``
    exactly 1. Invalid entries raise ValueError when concrete and give NaN under ``jit``."""
    n, c, k = jnp.broadcast_arrays(*(jnp.asarray(x, jnp.int32) for x in (n, c, k)))
    _check_counts("pass_hat_k", n, c, k)
    return _pass_hat_k(n, c, k)


@jax.jit
def _pass_hat_k(n: Array, c: Array, k: Array) -> Array:
    nf, cf = n.astype(jnp.float32), c.astype(jnp.float32)
    log_p = _log_product(jnp.where((c < k) | (c == n), 0, k),
                         lambda t: jnp.log((cf - t) / jnp.maximum(nf - t, 1.0)))
    out = jnp.where(c < k, 0.0, jnp.where(c == n, 1.0, jnp.exp(log_p)))
    return jnp.where(_invalid(n, c, k), jnp.nan, out)


def pass_at_k_curve(correct, ks: Sequence[int]) -> dict[str, np.ndarray]:
    """Mean unbiased pass@k over prompts for each k, and its standard error over prompts.

    ``correct`` is bool[P, n] (one row per prompt). Returns ``{"k": int[K], "mean": f64[K], "stderr":
    f64[K]}`` with ``stderr = std(ddof=1) / sqrt(P)`` (0 when P = 1)."""
    correct = np.asarray(correct, bool)
    if correct.ndim != 2:
        raise ValueError(f"pass_at_k_curve: correct must be bool[P, n], got shape {correct.shape}.")
    p, n = correct.shape
    ks = np.asarray(ks, np.int32).reshape(-1)
    vals = np.asarray(pass_at_k(n, correct.sum(axis=1)[None, :], ks[:, None]), np.float64)  # [K, P]
    stderr = vals.std(axis=1, ddof=1) / np.sqrt(p) if p > 1 else np.zeros(len(ks))
    return {"k": ks, "mean": vals.mean(axis=1), "stderr": stderr}
