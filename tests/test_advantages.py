"""Properties of the advantage estimators: the paper's example values, zero sums, k = 1 == GRPO, exact zeros
in degenerate groups, bootstrap convergence, float32 stability at n = 4096 against exact references, the
registry and validation, and identical results eagerly, under jit with 8-device sharding, and under vmap.

Most tests reuse the shared [72, 10] batches of tests/advantage_reference.py so that every estimator
compiles once for the whole file (k is traced inside the estimators)."""
import inspect
import math
import os
from fractions import Fraction

import chex
import jax
import jax.numpy as jnp
import mpmath
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from passk_jax import advantages as adv
from tests import advantage_reference as ref

BATCHES = ref.standard_batches()
CENTRED = ("passk_analytic", "grpo", "rloo", "passk_full", "passk_bootstrap", "combination", "exceed",
           "entropy_adaptive", "rs_grpo")  # maxrl too, where the mean reward is > 0 (test_zero_sum...)


def _all_estimators(rewards, mask, entropy, key, k=3, variants=True):
    """Every registered estimator at once (with ``variants``: also the other PKPO baselines and GRPO,
    max-minus-second and bootstrap options)."""
    out = {name: adv.compute(name, rewards, mask, k=k, key=key, entropy=entropy) for name in adv.names()}
    if not variants:
        return out
    for baseline in ("none", "sloo"):
        out[f"pkpo_{baseline}"] = adv.pkpo(rewards, k, mask, baseline=baseline)
    out["dr_grpo_ddof1"] = adv.grpo(rewards, mask, ddof=1, normalize=False)
    out["mms_normalized"] = adv.max_minus_second(rewards, mask, normalize=True)
    out["bootstrap_mean"] = adv.passk_bootstrap(key, rewards, k, mask, reduce="mean")
    return out


def _entropy(rows):
    return np.random.default_rng(7).integers(0, 10, rows).astype(np.float32)


def test_paper_example_values():
    rewards = (np.arange(32)[None, :] < np.arange(33)[:, None]).astype(np.float32)  # N_pos = 0..32
    out = np.asarray(adv.passk_analytic(rewards, 8))
    np.testing.assert_allclose(out[[1, 8]][:, [0, -1]], [[1.732, -0.056], [0.274, -0.091]], atol=5e-4)
    assert np.all(out[[0, 25, 32]] == 0)  # N_pos = 0, N_neg < k, all correct


@pytest.mark.parametrize("batch", ["binary", "plus_minus", "real"])
def test_zero_sum_and_k1_is_grpo(batch):
    rewards, mask = BATCHES[batch]
    key = jax.random.PRNGKey(0)
    for k in (1, 3, 5):
        for name in CENTRED:
            out = np.asarray(adv.compute(name, rewards, mask, k=k, key=key, entropy=_entropy(72)))
            scale = max(1.0, float(np.abs(out).max()))
            np.testing.assert_allclose(out.sum(axis=1), 0.0, atol=3e-5 * scale, err_msg=f"{name} k={k}")
    out = np.asarray(adv.maxrl(np.abs(rewards), mask))
    np.testing.assert_allclose(out.sum(axis=1), 0.0, atol=3e-5 * max(1.0, float(np.abs(out).max())))
    np.testing.assert_allclose(adv.passk_analytic(rewards, 1, mask), adv.grpo(rewards, mask, ddof=0),
                               rtol=2e-6, atol=2e-6)


def test_degenerate_groups_are_exactly_zero():
    rows = [np.full(7, 0.7), np.full(10, 0.1), np.full(3, -1e-3),  # constant non-binary groups
            [0.1, 0.5, 0.9, 0.9, 0.9],  # ranks k..n equal for k = 3: every subset maximum is 0.9
            [1, 1, 1, 1, 1, 0, 0, 1], [0] * 8, [1] * 6, [0, 1, 0], [1, 0]]  # binary: N_neg < k or N_pos = 0
    rewards = np.zeros((72, 10), np.float32)
    mask = np.zeros((72, 10), bool)
    for i, row in enumerate(rows):
        rewards[i, : len(row)], mask[i, : len(row)] = row, True
    constant = [0, 1, 2, 5, 6]
    key = jax.random.PRNGKey(0)
    for k in (3, 4):
        out = _all_estimators(rewards, mask, _entropy(72), key, k=k)
        out = {name: np.asarray(value) for name, value in out.items()}
        for name in ("passk_analytic", "passk_full", "passk_bootstrap", "bootstrap_mean", "exceed"):
            assert np.all(out[name][: len(rows)] == 0), (name, k)  # sigma = 0 for every Pass@k variant
        for name in ("grpo", "rloo", "dr_grpo_ddof1", "combination", "entropy_adaptive", "max_minus_second",
                     "mms_normalized", "pkpo", "maxrl", "rs_grpo"):  # pkpo: sloo_minus_one
            assert np.all(out[name][constant] == 0), (name, k)
    assert np.all(np.asarray(adv.passk_analytic(rewards, 2, mask))[3, :2] != 0)  # k = 2: rank 2 can win
    # the pitfall of an epsilon in the std: seven rewards of 0.7 must not give +-0.91
    assert np.all(np.asarray(adv.grpo(np.full((1, 7), 0.7, np.float32), ddof=1)) == 0)


def test_bootstrap_mean_converges_to_analytic():
    """reduce="mean" averages (M_S - mu_hat) / sigma_hat over the ~G k/n groups containing i. Its standard
    error is sd_i sqrt(n / (G k)), sd_i the spread of (M_S - mu)/sigma over those subsets (exact, from the
    reference), and mu_hat, sigma_hat from G groups add O((1 + |A_i|)/sqrt(G)). We allow 4 times the sum."""
    rng = np.random.default_rng(1)
    rewards = np.round(rng.normal(size=(4, 6)), 2).astype(np.float32)
    groups, k, n = 20000, 2, 6
    got = np.asarray(adv.passk_bootstrap(jax.random.PRNGKey(0), rewards, k, num_groups=groups, reduce="mean"))
    want = np.array([ref.passk_analytic(r, k) for r in rewards])
    sd = np.array([ref.passk_conditional_sd(r, k) for r in rewards])
    tol = 4 * (sd * np.sqrt(n / (groups * k)) + (1 + np.abs(want)) / np.sqrt(groups))
    assert np.all(np.abs(got - want) <= tol)


def test_bootstrap_sum_is_about_k_times_analytic():
    """With the paper's num_groups = n, the per-response sum over containing groups (Eq. 6) is ~k times the
    analytical advantage on average (4000 independent draws of the same prompt). Normalising by the mean and
    std of only G = 8 group maxima shrinks the values by ~1 - sqrt((G-1)/G) = 6.5% (the group's own maximum
    is part of mu_hat, sigma_hat); 12% of max |k A| covers that bias plus the O(1/G^2) terms and noise."""
    rewards = np.tile(np.array([0.3, -1.2, 0.5, 2.0, 0.5, -0.1, 1.1, 0.0], np.float32), (4000, 1))
    got = np.asarray(adv.passk_bootstrap(jax.random.PRNGKey(1), rewards, 3)).mean(axis=0)
    want = 3 * ref.passk_analytic(rewards[0], 3)
    assert np.abs(got - want).max() <= 0.12 * np.abs(want).max()


def _binary_reference(n, n_pos, k):
    """Eq. 11-15 in exact rationals (mpmath only for the square root)."""
    n_neg = n - n_pos
    if n_pos == 0 or n_neg < k:
        return 0.0, 0.0
    r_bar = 1 - Fraction(math.comb(n_neg, k), math.comb(n, k))
    sigma = mpmath.sqrt(mpmath.mpf(r_bar.numerator) / r_bar.denominator * (1 - r_bar))
    a_neg = 1 - r_bar - Fraction(math.comb(n_neg - 1, k - 1), math.comb(n - 1, k - 1))
    return float(mpmath.mpf((1 - r_bar).numerator) / (1 - r_bar).denominator / sigma), \
        float(mpmath.mpf(a_neg.numerator) / a_neg.denominator / sigma)


def _real_reference(values, k):
    """Counting formula at 50 digits with exact integer binomials c_j = C(j-1, k-1) (see _analytic_sorted)."""
    mpmath.mp.dps = 50
    order = np.argsort(values, kind="stable")
    r = [mpmath.mpf(float(v)) for v in values[order]]
    n = len(r)
    c = [0] * (n + 1)
    c[k] = 1
    for j in range(k, n):
        c[j + 1] = c[j] * j // (j - k + 1)
    total, top = math.comb(n, k), c[n]
    mu = sum(c[j] * r[j - 1] for j in range(k, n + 1)) / total
    sigma = mpmath.sqrt(sum(c[j] * (r[j - 1] - mu) ** 2 for j in range(k, n + 1)) / total)
    out, tail = np.zeros(n), mpmath.mpf(0)
    for j in range(n, 0, -1):  # tail = sum_{m > j} C(m-2, k-2) r_m
        out[order[j - 1]] = float((c[j] * r[j - 1] + tail) / top - mu) / float(sigma) if sigma else 0.0
        if k >= 2 and j >= 2:
            tail += c[j] * (k - 1) // (j - 1) * r[j - 1]
    return out


def test_binary_stability_n4096():
    """Unmasked batches use a float64 host table; masked ones compute log q on device in two-float form."""
    n, n_sub = 4096, 3000
    n_pos = [0, 1, 2, 3, 64, 1000, 2048, 2999, 4000, 4093, 4095, 4096]
    rewards = (np.arange(n)[None, :] < np.array(n_pos)[:, None]).astype(np.float32)
    sub_mask = np.zeros((len(n_pos), n), bool)
    sub_mask[:, n - n_sub:] = True  # 3000 valid slots (the last ones), min(N_pos, 3000) of them positive
    sub_rewards = np.roll(rewards, n - n_sub, axis=1)
    for k in (1, 2, 8, 64, 1024, 2999, 4096):
        want = np.array([_binary_reference(n, p, k) for p in n_pos])
        runs = [adv.passk_analytic(rewards, k),  # {0, 1} fast path, host table
                adv.passk_analytic(2 * rewards - 1, k),  # two-valued path, host table
                adv.passk_analytic(rewards, k, np.ones_like(sub_mask))]  # masked: on-device log q
        for out in map(np.asarray, runs):
            assert np.all(np.isfinite(out))
            # relative 2e-6 (~16 ulp); values below the float32 range (1e-59 at N_pos = 4000, k = 64) give 0
            np.testing.assert_allclose(out[:, 0], want[:, 0], rtol=2e-6, atol=1e-37)
            np.testing.assert_allclose(out[:, -1], want[:, 1], rtol=2e-6, atol=1e-37)
        if k <= n_sub:
            out = np.asarray(adv.passk_analytic(sub_rewards, k, sub_mask))
            want = np.array([_binary_reference(n_sub, min(p, n_sub), k) for p in n_pos])
            np.testing.assert_allclose(out[:, n - n_sub], want[:, 0], rtol=2e-6, atol=1e-37)
            np.testing.assert_allclose(out[:, -1], want[:, 1], rtol=2e-6, atol=1e-37)
            assert np.all(out[:, : n - n_sub] == 0)


def test_real_stability_n4096():
    n = 4096
    rng = np.random.default_rng(3)
    rewards = np.round(rng.uniform(size=(2, n)), 3).astype(np.float32)  # ties included
    mask = np.ones((2, n), bool)
    mask[1, rng.choice(n, 1096, replace=False)] = False  # a traced valid count of 3000
    for k in (1, 4, 64, 1000, 3000):
        out = np.asarray(adv.passk_analytic(rewards, k, mask))
        for i in range(2):
            want = _real_reference(rewards[i, mask[i]], k)
            err = np.abs(out[i, mask[i]] - want).max() / max(np.abs(want).max(), 1e-30)
            assert np.all(np.isfinite(out)) and err < 2e-5, (k, i, err)


def test_registry_and_validation():
    """Every public estimator is registered under its own name, with its options (the keyword parameters
    of its signature, at their defaults) and a one-sentence summary; the README's table is ``describe()``."""
    public = {name for name in dir(adv) if not name.startswith("_") and getattr(getattr(adv, name), "__wrapped__", None)}
    assert public - set(adv.names()) == {"bootstrap_groups"} and len(adv.names()) == 12  # a jitted helper
    for name in adv.names():
        e = adv.entry(name)
        assert adv.get(name) is getattr(adv, name) and e.name == name
        params = inspect.signature(e.fn.__wrapped__).parameters
        keyword = {p for p, v in params.items() if v.kind is v.KEYWORD_ONLY}
        assert set(e.options) == keyword and all(e.defaults[o] == params[o].default for o in keyword), name
        assert e.uses_k == ("k" in params) and e.summary.endswith(".") and "\n" not in e.summary
        for option in e.options.values():
            assert option.doc and option.rule.startswith("must")
        for option, default in e.defaults.items():  # every default passes its own rule
            assert e.options[option].check(default), (name, option)
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    assert adv.describe() in readme
    with pytest.raises(ValueError, match="valid names: combination, entropy_adaptive"):
        adv.get("pass_at_k")
    rewards = np.zeros((2, 8), np.float32)
    bad = [("grpo", 8, 1, dict(ddof=2)), ("passk_analytic", 8, 0, {}), ("passk_analytic", 8, 9, {}),
           ("passk_full", 8, 5, {}), ("pkpo", 4, 4, dict(baseline="sloo")),
           ("pkpo", 8, 2, dict(baseline="x")),
           ("passk_bootstrap", 8, 2, dict(reduce="max")), ("passk_bootstrap", 8, 2, dict(num_groups=0)),
           ("exceed", 8, 2, dict(base=1.0)), ("entropy_adaptive", 8, 2, dict(fraction=1.5)),
           ("rloo", 1, 1, {}), ("grpo", 8, 1, dict(bogus=1)), ("passk_analytic", 8, 2.0, {}),
           ("rs_grpo", 8, 1, dict(beta=0.0)), ("rs_grpo", 8, 1, dict(beta=float("inf"))),
           ("maxrl", 8, 1, dict(ddof=1)), ("max_minus_second", 1, 1, {}), ("grpo", 1, 1, dict(ddof=1))]
    for name, n, k, options in bad:
        with pytest.raises(ValueError) as err:
            adv.validate(name, n, k, **options)
        msg = str(err.value)
        assert "\n" not in msg and msg.endswith(".") and msg.count(". ") == 0, msg
    with pytest.raises(ValueError, match="exceeds the number of rollouts"):
        adv.passk_analytic(rewards, 9)  # the estimators validate eagerly too
    with pytest.raises(ValueError, match="PRNG key"):
        adv.compute("passk_bootstrap", rewards, k=2)
    with pytest.raises(ValueError, match="entropy"):
        adv.compute("entropy_adaptive", rewards, k=2)
    with pytest.raises(ValueError, match="unknown option 'k2'"):
        adv.compute("passk_analytic", rewards, k=2, k2=3)
    with pytest.raises(ValueError, match=r"shape \[P, n\]"):
        adv.grpo(np.zeros(8, np.float32))
    adv.validate("passk_full", 8, 4)
    out = adv.compute("grpo", jnp.asarray([[0.0, 1.0, 1.0]], jnp.bfloat16), k=7)  # k ignored, bf16 accepted
    assert out.dtype == jnp.float32


def test_identical_eager_sharded_jit_and_vmap():
    rewards, mask = BATCHES["real"]
    entropy, key = _entropy(72), jax.random.PRNGKey(3)
    eager = _all_estimators(rewards, mask, entropy, key, variants=False)

    mesh = Mesh(np.array(jax.devices()), ("data",))
    assert len(jax.devices()) == 8
    rows, vec = NamedSharding(mesh, PartitionSpec("data", None)), NamedSharding(mesh, PartitionSpec("data"))
    sharded = jax.jit(lambda *a: _all_estimators(*a, variants=False), out_shardings=rows)(
        jax.device_put(rewards, rows), jax.device_put(mask, rows), jax.device_put(entropy, vec), key)
    for name, value in eager.items():
        assert value.shape == (72, 10) and value.dtype == jnp.float32
        assert sharded[name].sharding == rows
        np.testing.assert_allclose(sharded[name], value, rtol=1e-6, atol=1e-6, err_msg=name)

    # vmap over two halves with mask=None equals the unbatched call with an all-true mask (the kernels;
    # combination and exceed are elementwise compositions of them, entropy_adaptive ranks the whole batch).
    full = np.where(mask, rewards, np.round(np.random.default_rng(5).normal(size=rewards.shape), 1))
    full = full.astype(np.float32)
    kernels = ("passk_analytic", "pkpo", "passk_full", "grpo", "rloo", "max_minus_second")
    halves = full.reshape(2, 36, 10)
    batched = jax.vmap(lambda r: {name: adv.compute(name, r, k=3) for name in kernels})(halves)
    for name, value in batched.items():
        unbatched = adv.compute(name, full, np.ones_like(mask), k=3)
        np.testing.assert_allclose(np.asarray(value).reshape(72, 10), unbatched, rtol=1e-6, atol=1e-6,
                                   err_msg=name)
    keys = jax.random.split(key, 2)  # bootstrap: vmap over keys; sums over groups reorder (1e-5)
    per_key = jax.vmap(lambda kk: adv.passk_bootstrap(kk, rewards, 3, mask))(keys)
    for i in range(2):
        np.testing.assert_allclose(per_key[i], adv.passk_bootstrap(keys[i], rewards, 3, mask),
                                   rtol=1e-5, atol=1e-5)


class EstimatorVariantsTest(chex.TestCase):
    """Each estimator gives the same advantages called eagerly and inside a user's ``jax.jit`` (options and
    k closed over), with the output shape and dtype of the contract."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_every_estimator(self):
        rewards, mask = BATCHES["binary"]
        entropy, key = _entropy(72), jax.random.PRNGKey(3)
        for name in adv.names():
            want = adv.compute(name, rewards, mask, k=2, key=key, entropy=entropy)
            got = self.variant(lambda r, m, e, kk: adv.compute(name, r, m, k=2, key=kk, entropy=e))(
                rewards, mask, entropy, key)
            chex.assert_shape(got, rewards.shape)
            chex.assert_type(got, jnp.float32)
            chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-6)

    def test_every_estimator_compiles_once_across_reward_values(self):
        """No estimator branches in Python on the rewards: new values of the same shape reuse the one trace."""
        entropy, key = _entropy(72), jax.random.PRNGKey(3)
        for name in adv.names():
            chex.clear_trace_counter()  # chex counts traces per code object: one lambda per estimator
            fn = jax.jit(chex.assert_max_traces(
                lambda r, m, e, kk, name=name: adv.compute(name, r, m, k=2, key=kk, entropy=e), n=1))
            rewards, mask = BATCHES["binary"]
            for values in (rewards, 1.0 - rewards, jnp.zeros_like(rewards), jnp.ones_like(rewards)):
                fn(values, mask, entropy, key)
