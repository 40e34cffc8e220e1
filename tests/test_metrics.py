"""Unbiased pass@k against exact integer arithmetic, pass@k curves, and the paper's eta argmax facts."""
import math
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from passk_jax import advantages as adv, metrics


def _exact(n, c, k):
    return 1 - Fraction(math.comb(n - c, k), math.comb(n, k))


def test_pass_at_k_matches_math_comb():
    n, c, k = np.array([(n, c, k) for n in range(1, 13) for c in range(n + 1) for k in range(1, n + 1)]).T
    got = np.asarray(metrics.pass_at_k(n, c, k))
    want = np.array([float(_exact(*t)) for t in zip(n, c, k)])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
    assert np.all(got[c == 0] == 0) and np.all(got[n - c < k] == 1)
    assert float(metrics.pass_at_k(4, 1, 4)) == 1.0  # not 0.684 (bootstrap with replacement)


def test_pass_at_k_float32_accurate_at_n4096():
    n = 4096
    c = np.array([1, 2, 5, 100, 2000, 4000, 4095])
    for k in (1, 7, 100, 2048, 4000):
        got = np.asarray(metrics.pass_at_k(n, c, k), np.float64)
        want = np.array([float(_exact(n, ci, k)) for ci in c])
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)  # float comb overflows past n ~ 1030


def test_pass_at_k_errors_and_jit():
    with pytest.raises(ValueError, match="1 <= k <= n"):
        metrics.pass_at_k(8, 2, 9)
    with pytest.raises(ValueError, match="0 <= c <= n"):
        metrics.pass_at_k(np.array([8, 8]), np.array([2, 9]), 4)
    jitted = jax.jit(metrics.pass_at_k)(jnp.array([8, 8]), jnp.array([2, 2]), jnp.array([4, 9]))
    assert float(jitted[0]) == pytest.approx(float(_exact(8, 2, 4)), rel=1e-6) and np.isnan(jitted[1])


def test_pass_hat_k_matches_math_comb():
    """pass^k = C(c, k) / C(n, k) (all k samples correct) in exact rationals, every n <= 12."""
    n, c, k = np.array([(n, c, k) for n in range(1, 13) for c in range(n + 1) for k in range(1, n + 1)]).T
    got = np.asarray(metrics.pass_hat_k(n, c, k))
    want = np.array([float(Fraction(math.comb(ci, ki), math.comb(ni, ki))) for ni, ci, ki in zip(n, c, k)])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
    assert np.all(got[c < k] == 0) and np.all(got[c == n] == 1)
    np.testing.assert_allclose(got[k == 1], (c / n)[k == 1], rtol=1e-6)  # pass^1 = pass@1
    big, cs = 4096, np.array([4096, 4095, 4000, 3000, 2048, 100])
    for kk in (1, 7, 100, 2048):  # relative error ~ |log p| eps; values below 1e-30 are not compared
        want = np.array([float(Fraction(math.comb(ci, kk), math.comb(big, kk))) for ci in cs])
        got = np.asarray(metrics.pass_hat_k(big, cs, kk), np.float64)
        np.testing.assert_allclose(got[want > 1e-30], want[want > 1e-30], rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match="pass_hat_k: k must satisfy 1 <= k <= n"):
        metrics.pass_hat_k(8, 2, 9)
    jitted = jax.jit(metrics.pass_hat_k)(jnp.array([8, 8]), jnp.array([5, 9]), jnp.array([2, 2]))
    assert float(jitted[0]) == pytest.approx(10 / 28, rel=1e-6) and np.isnan(jitted[1])


def test_pass_at_k_curve():
    rng = np.random.default_rng(0)
    correct = rng.random((50, 16)) < rng.random((50, 1))
    curve = metrics.pass_at_k_curve(correct, [1, 4, 16])
    per_prompt = np.array([[float(_exact(16, int(c), k)) for c in correct.sum(1)] for k in (1, 4, 16)])
    np.testing.assert_allclose(curve["mean"], per_prompt.mean(1), rtol=1e-6)
    np.testing.assert_allclose(curve["stderr"], per_prompt.std(1, ddof=1) / np.sqrt(50), rtol=1e-5)
    assert list(curve["k"]) == [1, 4, 16] and np.all(np.diff(curve["mean"]) >= 0)
    assert metrics.pass_at_k_curve(correct[:1], [2])["stderr"][0] == 0


def test_eta_argmax_facts():
    n = 32
    argmax = {k: int(np.argmax(adv.eta(n, k))) / n for k in (1, 4, 8)}
    assert argmax == {1: 0.5, 4: 0.25, 8: 0.125}
    p = np.arange(n + 1) / n
    np.testing.assert_allclose(adv.eta(n, 1, "grpo"), 2 * n * np.sqrt(p * (1 - p)), rtol=1e-5, atol=1e-5)
    assert np.argmax(adv.eta(n, 4, "exceed")) == 1  # Eq. 17 moves the peak to the hardest solved prompt
    assert adv.eta(n, 4)[-1] == 0 and adv.eta(n, 4)[0] == 0  # easy and unsolved prompts: no signal
    assert np.allclose(adv.eta(n, 4, lambda r: 2 * r), 2 * np.arange(n + 1))
