"""Token selection on raw logits: truncation sets vs a brute-force definition, logprobs, sampling frequencies."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from passk_jax.sampling_ops import first_argmax, modified_logits, select_tokens, token_logprobs


def reference_probs(logits: np.ndarray, temperature: float, top_p: float, top_k: int) -> np.ndarray:
    """Brute force in float64, straight from the definitions (no sorting): temperature -> top-k -> top-p,
    ties at either boundary kept; temperature 0 -> one-hot first argmax."""
    logits = np.asarray(logits, np.float64)
    if temperature == 0:
        q = np.zeros_like(logits)
        q[np.argmax(logits)] = 1.0
        return q
    z = np.asarray(np.float32(logits) / np.float32(temperature), np.float64)  # same rounding as the kernel
    v = len(z)
    keep = np.ones(v, bool)
    if 0 < top_k < v:
        keep = np.array([np.sum(z > z[i]) < top_k for i in range(v)])
    q = np.where(keep, np.exp(z - z.max()), 0.0)
    q /= q.sum()
    if top_p < 1:
        keep &= np.array([q[keep & (q > q[i])].sum() < top_p for i in range(v)])
        q = np.where(keep, q, 0.0)
        q /= q.sum()
    return q


LOGITS = np.array([2.0, 1.0, 1.0, 0.5, -0.3, 1.0, -2.0, 0.2], np.float32)  # ties at 1.0 (ids 1, 2, 5)
CASES = [  # (temperature, top_p, top_k)
    (1.0, 1.0, 0),
    (0.7, 1.0, 0),
    (1.5, 1.0, 2),    # the k-th value (1.0) is tied three ways: all three kept
    (1.0, 1.0, 8),    # k >= V: off
    (1.0, 0.6, 0),    # nucleus ends inside the tie group at 1.0
    (0.5, 0.9, 0),
    (2.0, 0.5, 5),
    (1.0, 0.05, 0),   # only the argmax
]


@pytest.mark.parametrize("temperature,top_p,top_k", CASES)
def test_truncation_matches_definition(temperature, top_p, top_k):
    z = modified_logits(jnp.asarray(LOGITS)[None], temperature, top_p, top_k)[0]
    q = np.asarray(jax.nn.softmax(z))
    want = reference_probs(LOGITS, temperature, top_p, top_k)
    np.testing.assert_array_equal(q > 0, want > 0)
    np.testing.assert_allclose(q, want, atol=1e-6)


def test_ties_kept_as_a_group():
    q = reference_probs(LOGITS, 1.5, 1.0, 2)
    assert (q > 0).sum() == 4  # argmax + the three tied at 1.0
    q = reference_probs(LOGITS, 1.0, 0.6, 0)
    assert np.flatnonzero(q > 0).tolist() == [0, 1, 2, 5]


@pytest.mark.parametrize("temperature,top_p,top_k", CASES + [(0.0, 0.5, 3)])
def test_sampling_frequencies(temperature, top_p, top_k):
    """N independent draws (one row each).  Bretagnolle-Huber-Carol: P(||p_hat - p||_1 >= lam) <=
    2^m exp(-N lam^2 / 2) for m categories; with m = 8, N = 100k and failure probability 1e-6 this gives
    lam = 0.0197, i.e. total variation <= 0.0098.  Tokens outside the kept set must never appear, and a
    chi-square goodness-of-fit over the kept set must not be rejected at 1e-6."""
    n, v = 100_000, len(LOGITS)
    logits = jnp.broadcast_to(jnp.asarray(LOGITS), (n, v))
    tok, lp = jax.jit(select_tokens)(jax.random.key(123), logits, temperature, top_p, top_k)
    counts = np.bincount(np.asarray(tok), minlength=v)
    want = reference_probs(LOGITS, temperature, top_p, top_k)
    assert counts[want == 0].sum() == 0
    lam = math.sqrt(2 * (v * math.log(2) + math.log(1e6)) / n)
    assert 0.5 * np.abs(counts / n - want).sum() <= lam / 2
    support = want > 0
    if support.sum() > 1:
        assert stats.chisquare(counts[support], n * want[support]).pvalue > 1e-6
    # Returned log-probabilities: the modified distribution (0 for greedy).
    tok = np.asarray(tok)
    want_lp = np.zeros(n) if temperature == 0 else np.log(want[tok])
    np.testing.assert_allclose(np.asarray(lp), want_lp, atol=1e-5)


def test_greedy_first_argmax_and_teacher_forced_logprobs():
    logits = jnp.array([[0.0, 3.0, 3.0, 1.0], [5.0, -1.0, 5.0, 0.0]])
    tok, lp = select_tokens(jax.random.key(0), logits, 0.0, 1.0, 0)
    np.testing.assert_array_equal(tok, [1, 0])
    np.testing.assert_array_equal(lp, [0.0, 0.0])
    np.testing.assert_array_equal(token_logprobs(logits, jnp.array([1, 2]), 0.0, 1.0, 0), [0.0, -np.inf])
    x = jnp.round(jax.random.normal(jax.random.key(1), (50, 9)))  # many ties
    np.testing.assert_array_equal(first_argmax(x), jnp.argmax(x, axis=-1))


def test_select_and_teacher_forced_agree():
    logits = jax.random.normal(jax.random.key(1), (64, 50)) * 3
    select, teacher = jax.jit(select_tokens), jax.jit(token_logprobs)
    for t, p, k in [(0.8, 0.9, 10), (1.0, 1.0, 0), (1.3, 0.7, 0)]:
        tok, lp = select(jax.random.key(2), logits, t, p, k)
        np.testing.assert_allclose(lp, teacher(logits, tok, t, p, k), atol=1e-6)
        assert np.all(np.isfinite(lp))


def test_one_compilation_across_knobs():
    f = jax.jit(chex.assert_max_traces(select_tokens, n=1))  # temperature, top-p, top-k are traced values
    logits = jnp.asarray(LOGITS)[None]
    for t, p, k in [(1.0, 1.0, 0), (0.0, 1.0, 0), (0.5, 0.3, 2), (2.0, 0.9, 0)]:
        f(jax.random.key(0), logits, jnp.float32(t), jnp.float32(p), jnp.int32(k))


@pytest.mark.parametrize("top_p,top_k", [(0.95, 0), (0.5, 0), (0.999, 0), (1.0, 40), (0.9, 100), (0.3, 7)])
def test_bisection_thresholds_equal_the_sorted_definition(top_p, top_k):
    """Wide rows (a 4099-token vocabulary) with ties, negative and positive values and masked (-inf) tokens:
    the bisection over order keys keeps exactly the tokens the sort-based definition keeps."""
    from bench.top_p import sorted_cutoff_mask
    from passk_jax.sampling_ops import _cutoff_mask

    z = jnp.round(jax.random.normal(jax.random.key(3), (48, 4099)) * 4, 1)  # many ties
    z = z.at[0].set(1.0).at[1, :3].set(0.0).at[1, 3:].set(-1.0)  # a row all equal; a row with 0 on top
    z = z.at[1, 1].set(-0.0).at[:, -50:].set(-jnp.inf)  # -0.0 ties with 0.0; masked tokens in every row
    got = jax.jit(_cutoff_mask)(z, jnp.float32(top_p), jnp.int32(top_k))
    want = sorted_cutoff_mask(z, jnp.float32(top_p), jnp.int32(top_k))
    chex.assert_trees_all_equal(got, want)
    assert int(got.sum(-1).min()) >= 1


def test_negative_zero_ties_with_zero():
    from passk_jax.sampling_ops import _cutoff_mask

    z = jnp.array([[1.0, 0.0, -0.0, -1.0], [-0.0, 2.0, 0.0, -3.0]])
    got = _cutoff_mask(z, jnp.float32(1.0), jnp.int32(2))  # the 2nd largest value is 0: both zeros kept
    chex.assert_trees_all_equal(got, jnp.array([[True, True, True, False], [True, True, True, False]]))
    np.testing.assert_array_equal(got, sorted_reference(z, 1.0, 2))


def sorted_reference(z, top_p, top_k):
    from bench.top_p import sorted_cutoff_mask

    return sorted_cutoff_mask(z, jnp.float32(top_p), jnp.int32(top_k))
