"""Every estimator against an independent float64 enumeration of k-subsets (tests/advantage_reference.py).

All n <= 10 and all k <= n are covered in one static width of 10 with random masks (masked slots hold
garbage, NaN included; the reference sees only the valid rewards, so this also proves that a mask is
equivalent to dropping the rollouts): every binary count N_pos = 0..n, {-1, +1} rewards, and real-valued
rewards with ties and constant groups. Tolerance 1e-5 (absolute and relative). k is traced inside the
estimators, so each estimator compiles once for all k."""
import math

import jax
import numpy as np
import pytest

from passk_jax import advantages as adv
from tests import advantage_reference as ref

TOL = dict(rtol=1e-5, atol=1e-5)
WIDTH = ref.WIDTH


def _batches():
    return ref.standard_batches()


def _reference(fn, rewards, mask):
    out = np.zeros(rewards.shape)
    for i in range(len(rewards)):
        out[i, mask[i]] = fn(rewards[i, mask[i]].astype(np.float64))
    return out


def _check(estimator, reference, batch):
    rewards, mask = _batches()[batch]
    got = np.asarray(estimator(rewards, mask))
    assert got.dtype == np.float32 and np.all(got[~mask] == 0)
    np.testing.assert_allclose(got, _reference(reference, rewards, mask), **TOL)


@pytest.mark.parametrize("k", range(1, WIDTH + 1))
def test_passk_analytic_all_paths(k):
    fn = lambda r, m: adv.passk_analytic(r, k, m)  # noqa: E731
    for batch in ("binary", "plus_minus", "real"):
        _check(fn, lambda r: ref.passk_analytic(r, k), batch)


@pytest.mark.parametrize("k,baseline", [(k, b) for b in adv.PKPO_BASELINES for k in range(1, WIDTH + 1)
                                         if b != "sloo" or k < WIDTH])  # sloo needs n >= k + 1
def test_pkpo(k, baseline):
    fn = lambda r, m: adv.pkpo(r, k, m, baseline=baseline)  # noqa: E731
    for batch in ("binary", "real"):
        _check(fn, lambda r: ref.pkpo(r, k, baseline), batch)


@pytest.mark.parametrize("k", range(1, WIDTH // 2 + 1))
def test_passk_full(k):
    _check(lambda r, m: adv.passk_full(r, k, m), lambda r: ref.passk_full(r, k), "real")
    _check(lambda r, m: adv.passk_full(r, k, m, ddof=1), lambda r: ref.passk_full(r, k, ddof=1), "binary")


@pytest.mark.parametrize("k", range(1, WIDTH + 1))
def test_combination_exceed(k):
    log10 = dict(a=4.0, b=1.0, base=10.0, threshold=0.0)
    for batch in ("binary", "real"):
        _check(lambda r, m: adv.combination(r, k, m), lambda r: ref.combination(r, k), batch)
        _check(lambda r, m: adv.exceed(r, k, m), lambda r: ref.exceed(r, k), batch)
        _check(lambda r, m: adv.exceed(r, k, m, **log10), lambda r: ref.exceed(r, k, **log10), batch)


def test_maxrl():
    """(R - mean R) / mean R over the valid rewards: binary, +-1 (mean <= 0 gives 0) and nonnegative reals."""
    for batch in ("binary", "plus_minus"):
        _check(adv.maxrl, ref.maxrl, batch)
    rewards, mask = _batches()["real"]
    got = np.asarray(adv.maxrl(np.abs(rewards), mask))
    np.testing.assert_allclose(got, _reference(ref.maxrl, np.abs(rewards), mask), **TOL)


@pytest.mark.parametrize("beta", [0.5, 2.0, 8.0, -1.0])
def test_rs_grpo(beta):
    """The exponential-utility advantage against the direct float64 formula; beta = 8 on rewards up to 2
    would overflow nothing here but shows the shifted form loses no accuracy at exp(16)."""
    for batch in ("binary", "real"):
        _check(lambda r, m: adv.rs_grpo(r, m, beta=beta), lambda r: ref.rs_grpo(r, beta), batch)


def test_rs_grpo_small_beta_is_centred_reward():
    """beta -> 0: A -> R - mean R (the risk-neutral limit), with no cancellation in the expm1 form."""
    rewards, mask = _batches()["real"]
    got = np.asarray(adv.rs_grpo(rewards, mask, beta=1e-4))
    want = _reference(lambda r: r - r.mean() if r.max() > r.min() else 0 * r, rewards, mask)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("k", [1, 3, 7, 10])
def test_entropy_adaptive(k):
    rewards, mask = _batches()["real"]
    entropy = np.random.default_rng(k).integers(0, 20, len(rewards)).astype(np.float32)  # many ties
    got = np.asarray(adv.entropy_adaptive(rewards, entropy, k, mask))
    high = np.zeros(len(rewards), bool)
    n_high = math.floor(0.5 * len(rewards) + 0.5)  # 33 of 65: rounds half up
    high[sorted(range(len(rewards)), key=lambda i: (-entropy[i], i))[:n_high]] = True
    want = np.where(high[:, None], _reference(ref.grpo, rewards, mask),
                    _reference(lambda r: ref.passk_analytic(r, k), rewards, mask))
    np.testing.assert_allclose(got, want, **TOL)


@pytest.mark.parametrize("batch", ["binary", "real"])
def test_pass1_baselines(batch):
    for ddof in (0, 1):
        for normalize in (True, False):
            _check(lambda r, m: adv.grpo(r, m, ddof=ddof, normalize=normalize),
                   lambda r: ref.grpo(r, ddof, normalize), batch)
    _check(adv.rloo, ref.rloo, batch)
    for normalize in (True, False):
        _check(lambda r, m: adv.max_minus_second(r, m, normalize=normalize),
               lambda r: ref.max_minus_second(r, normalize), batch)


@pytest.mark.parametrize("k", [1, 2, 5, 10])
@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_passk_bootstrap_given_groups(k, reduce):
    """Alg. 2 with the groups it drew: each group is k distinct valid indices; advantages match a reference
    computed from those groups."""
    rewards, mask = _batches()["real"]
    key = jax.random.PRNGKey(k)
    got = np.asarray(adv.passk_bootstrap(key, rewards, k, mask, num_groups=7, reduce=reduce))
    members = np.asarray(adv.bootstrap_groups(key, mask, k, 7))
    want = np.zeros(rewards.shape)
    for i in range(len(rewards)):
        if mask[i].sum() < k:
            continue
        assert np.all(members[i].sum(axis=1) == k) and not np.any(members[i][:, ~mask[i]])
        groups = [np.flatnonzero(g) for g in members[i]]
        want[i] = ref.bootstrap_from_groups(np.nan_to_num(rewards[i]), groups, reduce)
    np.testing.assert_allclose(got, want, **TOL)
