"""passk_jax.rl.losses against hand-written NumPy loops (first principles, float64)."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from passk_jax.rl import losses

B, S, V = 5, 7, 11


def _example(seed=0):
    rng = np.random.default_rng(seed)
    logp = np.log(rng.uniform(0.05, 0.9, size=(B, S)))
    # ratios spread well beyond both clip edges and the dual-clip cap
    old_logp = logp - rng.normal(0.0, 0.6, size=(B, S))
    adv = np.repeat(rng.normal(size=(B, 1)), S, axis=1)
    adv[1] = 0.0
    mask = rng.uniform(size=(B, S)) < 0.7
    mask[2] = False  # an empty row: counts in no denominator
    mask[0, :] = True
    return logp, old_logp, adv, mask


def _np_token_loss(logp, old, adv, mask, eps_low, eps_high, dual, level, lr_clip):
    out = np.zeros_like(logp)
    for b in range(logp.shape[0]):
        n = mask[b].sum()
        seq = sum(logp[b, t] - old[b, t] for t in range(logp.shape[1]) if mask[b, t]) / max(n, 1)
        for t in range(logp.shape[1]):
            lr = seq if level == "sequence" else logp[b, t] - old[b, t]
            r = np.exp(min(max(lr, -lr_clip), lr_clip))
            a = adv[b, t]
            loss = max(-a * r, -a * min(max(r, 1 - eps_low), 1 + eps_high))
            if dual is not None and a < 0:
                loss = min(loss, -a * dual)
            out[b, t] = loss
    return out


def _np_aggregate(values, mask, mode, norm_length=None):
    rows = [b for b in range(values.shape[0]) if mask[b].any()]
    if mode == "token_mean":
        return sum(values[b, t] for b in range(values.shape[0]) for t in range(values.shape[1]) if mask[b, t]) / mask.sum()
    if mode == "seq_mean_token_mean":
        return np.mean([values[b][mask[b]].mean() for b in rows])
    length = values.shape[1] if norm_length is None else norm_length
    return sum(values[b][mask[b]].sum() for b in rows) / (len(rows) * length)


CLIPS = [  # (eps_low, eps_high, dual_clip)
    (0.2, 0.28, None),  # the paper's DAPO clip-higher
    (0.2, 0.2, None),  # symmetric PPO
    (0.2, 0.28, 3.0),  # dual clip
    (0.1, 0.5, 1.5),
]


@pytest.mark.parametrize("mode,clip,level", list(itertools.product(losses.AGGREGATIONS, CLIPS, ["token", "sequence"])))
def test_loss_matches_numpy(mode, clip, level):
    logp, old, adv, mask = _example()
    eps_low, eps_high, dual = clip
    want_tok = _np_token_loss(logp, old, adv, mask, eps_low, eps_high, dual, level, 20.0)
    want = _np_aggregate(want_tok, mask, mode)
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    tok, _ = losses.per_token_objective(
        f32(logp), f32(old), f32(adv), jnp.asarray(mask),
        eps_low=eps_low, eps_high=eps_high, dual_clip=dual, ratio_level=level,
    )
    np.testing.assert_allclose(np.where(mask, tok, 0), np.where(mask, want_tok, 0), rtol=1e-5, atol=1e-6)
    got = losses.finalize(*losses.aggregate(tok, jnp.asarray(mask), mode))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_clip_flags_and_dual_clip_cap():
    adv = jnp.array([[1.0, 1.0, -1.0, -1.0, -1.0, 1.0]])
    ratio = jnp.array([[1.5, 1.1, 0.5, 4.0, 1.1, 0.5]])
    loss, flags = losses.clipped_surrogate(jnp.log(ratio), adv, eps_low=0.2, eps_high=0.28, dual_clip=3.0)
    np.testing.assert_allclose(loss, [[-1.28, -1.1, 0.8, 3.0, 1.1, -0.5]], rtol=1e-6)
    np.testing.assert_array_equal(flags["clip_high"], [[1, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(flags["clip_low"], [[0, 0, 1, 0, 0, 0]])
    np.testing.assert_array_equal(flags["clip_dual"], [[0, 0, 0, 1, 0, 0]])


def test_gradient_zero_where_clipped_and_log_ratio_clamp():
    adv = jnp.array([[1.0, -1.0, 1.0]])
    old = jnp.zeros((1, 3))
    mask = jnp.ones((1, 3), bool)

    def f(logp):
        tok, _ = losses.per_token_objective(logp, old, adv, mask, log_ratio_clip=20.0)
        return jnp.sum(tok)

    g = jax.grad(f)(jnp.array([[0.5, -0.5, 0.0]]))  # r=1.65>1.28 clipped, r=0.61<0.8 clipped, r=1 active
    np.testing.assert_allclose(g, [[0.0, 0.0, -1.0]], atol=1e-7)
    lr = losses.log_ratio(jnp.array([[100.0]]), jnp.zeros((1, 1)), mask[:, :1], log_ratio_clip=20.0)
    assert float(lr[0, 0]) == 20.0


def test_gspo_gradient_is_sequence_level():
    """GSPO-token with seq_mean_token_mean: grad wrt logp_t = -A s_i / |o_i| inside the clip range."""
    logp = jnp.array([[-1.0, -2.0, -0.5, 0.0]])
    old = logp - jnp.array([[0.05, -0.02, 0.01, 0.0]])
    mask = jnp.array([[True, True, True, False]])
    adv = jnp.full((1, 4), 0.7)

    def f(lp):
        tok, _ = losses.per_token_objective(lp, old, adv, mask, ratio_level="sequence")
        return losses.finalize(*losses.aggregate(tok, mask, "seq_mean_token_mean"))

    s = np.exp(np.mean([0.05, -0.02, 0.01]))
    np.testing.assert_allclose(f(logp), -0.7 * s, rtol=1e-6)
    np.testing.assert_allclose(jax.grad(f)(logp), [[-0.7 * s / 3] * 3 + [0.0]], rtol=1e-6)


def test_aggregate_is_additive_over_row_splits():
    logp, old, adv, mask = _example(3)
    vals = jnp.asarray(_np_token_loss(logp, old, adv, mask, 0.2, 0.28, None, "token", 20.0), jnp.float32)
    m = jnp.asarray(mask)
    for mode in losses.AGGREGATIONS:
        whole = losses.finalize(*losses.aggregate(vals, m, mode))
        parts = [losses.aggregate(vals[i:j], m[i:j], mode) for i, j in [(0, 2), (2, 3), (3, 5)]]
        split = losses.finalize(sum(p[0] for p in parts), sum(p[1] for p in parts))
        np.testing.assert_allclose(split, whole, rtol=1e-6)
        np.testing.assert_allclose(losses.loss_denominator(m, mode), losses.aggregate(vals, m, mode)[1])


def test_empty_mask_gives_zero_not_nan():
    z = jnp.zeros((2, 3))
    m = jnp.zeros((2, 3), bool)
    for mode in losses.AGGREGATIONS:
        assert float(losses.finalize(*losses.aggregate(z + 1.0, m, mode))) == 0.0
    with pytest.raises(ValueError, match="aggregation"):
        losses.aggregate(z, m, "mean")


def test_kl_estimators():
    rng = np.random.default_rng(1)
    logp = np.log(rng.uniform(0.05, 0.9, size=(3, 4)))
    ref = np.log(rng.uniform(0.05, 0.9, size=(3, 4)))
    lr = logp - ref
    want = {"k1": lr, "k2": 0.5 * lr**2, "k3": np.exp(-lr) - 1 + lr}
    for name, w in want.items():
        np.testing.assert_allclose(losses.kl_penalty(jnp.asarray(logp, jnp.float32), jnp.asarray(ref, jnp.float32), name), w, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(losses.kl_penalty(jnp.asarray(logp), jnp.asarray(logp), name), 0.0)
    # k3 is an unbiased estimate of KL(p || q) under samples of p
    p = np.array([0.5, 0.3, 0.2]); q = np.array([0.2, 0.2, 0.6])
    k3 = losses.kl_penalty(jnp.log(jnp.asarray(p)), jnp.log(jnp.asarray(q)), "k3")
    np.testing.assert_allclose(np.sum(p * np.asarray(k3)), np.sum(p * np.log(p / q)), rtol=1e-5)


def test_kl_zero_when_reference_is_policy_and_coefficients_enter_total():
    logp, old, adv, mask = _example(2)
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    ent = f32(np.abs(logp))
    base, _ = losses.per_token_objective(f32(logp), f32(old), f32(adv), jnp.asarray(mask))
    tot, st = losses.per_token_objective(
        f32(logp), f32(old), f32(adv), jnp.asarray(mask), ref_logp=f32(logp), kl_coef=0.5,
        entropy=ent, entropy_coef=0.01,
    )
    np.testing.assert_array_equal(st["kl"], 0.0)
    np.testing.assert_allclose(tot, base - 0.01 * ent, rtol=1e-6)
    # and the gradient of k3 at pi == pi_ref is zero
    g = jax.grad(lambda lp: jnp.sum(losses.kl_penalty(lp, jax.lax.stop_gradient(lp), "k3")))(f32(logp))
    np.testing.assert_array_equal(g, 0.0)


def test_logprobs_and_entropy_from_logits():
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(2, S, V)) * 3
    tokens = rng.integers(0, V, size=(2, S))
    lp, ent = losses.shifted_logprobs_and_entropy(jnp.asarray(logits, jnp.float32), jnp.asarray(tokens), 0.7)
    z = logits / 0.7
    logsm = z - np.log(np.exp(z).sum(-1, keepdims=True))
    want_lp = np.zeros((2, S)); want_ent = np.zeros((2, S))
    for b in range(2):
        for s in range(1, S):
            want_lp[b, s] = logsm[b, s - 1, tokens[b, s]]
            want_ent[b, s] = -np.sum(np.exp(logsm[b, s - 1]) * logsm[b, s - 1])
    np.testing.assert_allclose(lp, want_lp, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ent, want_ent, rtol=1e-5, atol=1e-5)
    # large logits stay finite
    big = jnp.asarray([[[1e4, 0.0, -1e4]]], jnp.float32)
    assert np.isfinite(losses.entropy_from_logits(big)).all()
    assert np.isfinite(losses.token_logprobs(big, jnp.array([[2]]))).all()


@pytest.mark.parametrize("chunk,temperature", [(1, 1.0), (3, 0.7), (8, 1.0), (64, 1.3)])
def test_chunked_logprobs_equal_full_logits(chunk, temperature):
    """The chunked LM head gives the full-logits log-probs and entropies, and the same gradients w.r.t. the
    hidden states and the head (chunks that do not divide S - 1, one position per chunk, one chunk)."""
    rng = np.random.default_rng(0)
    B, S, D, V = 3, 9, 6, 11
    hidden = jnp.asarray(rng.normal(size=(B, S, D)), jnp.float32)
    head = jnp.asarray(rng.normal(size=(D, V)), jnp.float32)
    tokens = jnp.asarray(rng.integers(0, V, (B, S)), jnp.int32)
    w = jnp.asarray(rng.normal(size=(2, B, S)), jnp.float32)

    def full(h, W):
        return losses.shifted_logprobs_and_entropy(jnp.einsum("bsd,dv->bsv", h, W), tokens, temperature)

    def chunked(h, W):
        return losses.chunked_shifted_logprobs_and_entropy(h, W, tokens, temperature, chunk)

    for a, b in zip(chunked(hidden, head), full(hidden, head)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    scalar = lambda f: lambda h, W: sum(jnp.sum(x * wi) for x, wi in zip(f(h, W), w))  # noqa: E731
    g_full = jax.grad(scalar(full), (0, 1))(hidden, head)
    g_chunk = jax.jit(jax.grad(scalar(chunked), (0, 1)))(hidden, head)
    for a, b in zip(g_chunk, g_full):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
