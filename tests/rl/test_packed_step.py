"""The packed update (``step.packing="lengths"``) against the padded one, and the plan it follows.

The padded update (``rl.step.make_train_step``) is the reference: the packed one must give the same parameters
up to float32 summation order for every partition, aggregation and mesh, while computing only rows that can
move the parameters, trimmed to length buckets, with a bounded number of compiled shapes.
"""
import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import configs
from passk_jax import parallel
from passk_jax.rl import losses, packing, step as st
from passk_jax.rl.packed_step import make_packed_train_step
from passk_jax.run.spec import RunSpec
from tests.rl.helpers import make_batch, tiny_model, toy_model

BASE = st.StepConfig(estimator="passk_analytic", k=2, learning_rate=1e-3, warmup_steps=2, adam_eps=1e-4,
                     num_minibatches=2, num_microbatches=2, grad_clip_norm=1.0, weight_decay=0.01,
                     old_logprobs="recompute")
# whole-batch metrics that must not change (the others are documented as taken over the computed rows)
SAME = ("loss", "pg_loss", "kl", "grad_norm", "clip_low_frac", "clip_high_frac", "clip_dual_frac", "lr",
        "adv_mean", "adv_zero_prompt_frac", "reward_mean", "response_length_mean", "valid_frac", "advantages")


def _mesh1():
    return parallel.make_mesh(1, 1, 1, devices=jax.devices()[:1])


def _run(make, cfg, model, mesh, batches):
    graphdef, params = model
    init, fn = make(graphdef, cfg, mesh, params)
    state, out = init(params, jax.random.PRNGKey(3)), []
    for b in batches:
        state, m = fn(state, b)
        out.append(jax.device_get(m))
    return jax.device_get(state.params), out, fn


def _update_diff(params0, a, b) -> float:
    """|update_a - update_b| / |update_a| over all parameters: the packed update against the padded one."""
    flat = lambda t: np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)])  # noqa: E731
    p0, da, db = flat(jax.device_get(params0)), flat(a), flat(b)
    return float(np.linalg.norm(da - db) / np.linalg.norm(da - p0))


# ----------------------------------------------------------------------------- the plan (host numpy)
@pytest.mark.parametrize("seed,dp,budget,buckets", [(0, 1, 64, 4), (1, 2, 150, 3), (2, 4, 480, 8), (3, 8, 512, 2)])
def test_plan_covers_each_needed_row_once_within_budget_and_bound(seed, dp, budget, buckets):
    rng = np.random.default_rng(seed)
    R, M, start, S = 64, 2, 20, 60
    widths = np.where(rng.uniform(size=R) < 0.1, 0, start + rng.integers(1, S - start + 1, R))
    need = (widths > 0) & (rng.uniform(size=R) < 0.7)
    mb = np.arange(R) // (R // M)
    lad = packing.ladder(start, S, buckets)
    assert lad[-1] == S and list(lad) == sorted(set(lad)) and len(lad) <= buckets
    plan = packing.plan(widths, need, mb, M, lad, budget, dp)
    seen = np.concatenate([x.rows for micros in plan for x in micros])
    seen = seen[seen >= 0]
    assert sorted(seen) == sorted(np.flatnonzero(need))  # every needed row exactly once
    shapes = set()
    for m, micros in enumerate(plan):
        for x in micros:
            rows = x.rows[x.rows >= 0]
            assert x.minibatch == m and np.all(mb[rows] == m) and x.width in lad
            assert np.all(widths[rows] <= x.width) and len(x.rows) * x.width <= budget and len(x.rows) % dp == 0
            per_shard = [int(widths[r[r >= 0]].sum()) for r in x.rows.reshape(dp, -1)]
            assert max(per_shard) - min(per_shard) <= 2 * x.width  # dealt back and forth: tokens balanced
            shapes.add((len(x.rows), x.width))
    assert len(shapes) <= packing.shape_bound(lad, budget, dp)


def test_plan_refuses_a_budget_below_one_row_group():
    with pytest.raises(ValueError, match=r"max_tokens_per_microbatch=100 is smaller than 2 row\(s\) .* at least 120"):
        packing.plan(np.array([60]), np.array([True]), np.array([0]), 1, (60,), 100, 2)


# ----------------------------------------------------------------------------- which rows may be skipped
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
@pytest.mark.parametrize("dual_clip", [None, 3.0])
def test_a_zero_advantage_row_has_zero_loss_and_gradient_without_kl_or_entropy(ratio_level, dual_clip):
    rng = np.random.default_rng(0)
    lp = jnp.asarray(-rng.uniform(0.1, 8.0, (6, 9)), jnp.float32)
    old = lp + jnp.asarray(rng.normal(0, 3.0, lp.shape), jnp.float32)  # ratios far outside every clip
    mask = jnp.asarray(rng.uniform(size=lp.shape) < 0.8)
    adv = jnp.asarray([0.0, 1.3, 0.0, -0.7, 0.0, 2.0])
    ent = jnp.asarray(rng.uniform(0.5, 3.0, lp.shape), jnp.float32)
    ref = lp + 0.5

    def loss(lp, cfg):
        tok, _ = losses.per_token_objective(lp, old, adv[:, None], mask, dual_clip=dual_clip,
                                            ratio_level=ratio_level, entropy=ent, entropy_coef=cfg.entropy_coef,
                                            ref_logp=ref if cfg.kl_coef else None, kl_coef=cfg.kl_coef)
        return losses.aggregate_sum(tok, mask, "token_mean"), tok

    for cfg in (st.StepConfig(), st.StepConfig(kl_coef=0.1), st.StepConfig(entropy_coef=0.01)):
        g, tok = jax.grad(loss, has_aux=True)(lp, cfg)
        zero_rows = np.asarray(adv) == 0
        skippable = bool(np.all(np.asarray(g)[zero_rows] == 0) and np.all(np.asarray(tok)[zero_rows] == 0))
        assert cfg.skips_zero_advantage == skippable, cfg
    assert not st.StepConfig(log_ratio_clip=None).skips_zero_advantage  # an unclamped ratio may overflow


# ----------------------------------------------------------------------------- the packed update = the padded one
CASES = {
    "token_mean": {},
    "seq_mean_sequence_ratio": dict(aggregation="seq_mean_token_mean", ratio_level="sequence", num_minibatches=4,
                                    num_microbatches=1),
    "drgrpo_small_budget": dict(aggregation="seq_mean_token_sum_norm", max_tokens_per_microbatch=40,
                                length_buckets=3),
    "sampler_logprobs": dict(old_logprobs="sampler", num_minibatches=1, num_microbatches=4, dual_clip=3.0),
    "kl_nothing_skipped": dict(kl_coef=0.1),
    "entropy_adaptive_recompute": dict(estimator="entropy_adaptive"),
}


def _packed_equals_padded(cfg, model, batches):
    """Runs the padded and the packed update on ``batches`` (one device) and checks they agree: two steps, each
    of several AdamW updates (eps 1e-4 keeps them smooth in the gradient), so the parameter change differs
    only by float32 summation order, ~1e-7 relative (a row or denominator mistake is >= 1e-2), and the
    whole-batch metrics agree. Returns (padded parameters, packed metrics, packed train_step)."""
    want, wm, _ = _run(st.make_train_step, dataclasses.replace(cfg, packing="off"), model, _mesh1(), batches)
    got, gm, fn = _run(make_packed_train_step, cfg, model, _mesh1(), batches)
    assert _update_diff(model[1], want, got) < 2e-5
    for a, b in zip(wm, gm):
        for name in SAME:
            np.testing.assert_allclose(b[name], a[name], rtol=2e-5, atol=1e-6, err_msg=name)
    return want, gm, fn


@pytest.mark.parametrize("case", sorted(CASES))
def test_packed_update_equals_padded_update(case):
    cfg = dataclasses.replace(BASE, **CASES[case])
    model = toy_model()
    batches = [make_batch(seed=s, completion_len=13) for s in (0, 1)]
    _, gm, fn = _packed_equals_padded(cfg, model, batches)
    valid = np.concatenate([b.valid.ravel() for b in batches[-1:]])
    if not cfg.skips_zero_advantage or case == "entropy_adaptive_recompute":
        assert gm[-1]["rows_computed_frac"] == pytest.approx(valid.mean())  # every row with tokens
    else:  # exactly the rows with a non-zero advantage
        assert gm[-1]["rows_computed_frac"] == pytest.approx(np.mean(np.asarray(gm[-1]["advantages"]) != 0))
        assert gm[-1]["positions_frac"] < 0.75
    assert fn.programs.grad._cache_size() <= packing.shape_bound(
        packing.ladder(5, 18, cfg.length_buckets), cfg.max_tokens_per_microbatch or 18 * 32 // 4, 1)


@pytest.mark.parametrize("case", ["recompute", "sampler_kl"])
def test_each_prompt_once_equals_the_padded_update(case):
    """The decoder with group-shared prompts: each prompt runs once per micro-batch shard (fewer positions than
    the packed update without sharing), same update and metrics as the padded one, also with KL (every row
    computed) and on a data x fsdp mesh; a batch whose groups do not share their prompt runs rows whole."""
    cfg = dataclasses.replace(BASE, **({} if case == "recompute" else
                                       dict(old_logprobs="sampler", kl_coef=0.1, num_minibatches=1)))
    model = tiny_model()
    batches = [make_batch(P=6, n=8, seed=s, prompt_len=8, completion_len=6, shared_prompts=True) for s in (0, 1)]
    want, gm, fn = _packed_equals_padded(cfg, model, batches)
    assert fn.programs.can_share
    if case == "recompute":
        got_mesh, _, _ = _run(make_packed_train_step, cfg, model, parallel.make_mesh(2, 2, 1, devices=jax.devices()[:4]),
                              batches)
        assert _update_diff(model[1], want, got_mesh) < 2e-5
    else:  # the rows' 7 prompt columns (of 14) count once per group and micro-batch: 0.625 of the positions
        _, um, _ = _run(make_packed_train_step, dataclasses.replace(cfg, share_prompts=False), model, _mesh1(),
                        batches[:1])
        assert um[0]["positions_frac"] == 1.0 and gm[0]["positions_frac"] == pytest.approx(0.625)
        # rows of a group with different prompts: nothing is shared, the update is still the padded one's
        mixed = [make_batch(P=6, n=8, seed=0, prompt_len=8, completion_len=6)]
        want, _, _ = _run(st.make_train_step, dataclasses.replace(cfg, packing="off"), model, _mesh1(), mixed)
        got, mm, _ = _run(make_packed_train_step, cfg, model, _mesh1(), mixed)
        assert _update_diff(model[1], want, got) < 2e-5 and mm[0]["positions_frac"] == 1.0


def test_prompt_slots_name_a_row_of_the_same_group_on_the_same_shard():
    from passk_jax.rl.packed_step import _groups_per_minibatch, _order, _prompt_slots

    rng = np.random.default_rng(0)
    R, n, M, dp = 48, 4, 2, 2
    widths = 10 + rng.integers(1, 9, R)
    need = rng.uniform(size=R) < 0.7
    plan = packing.plan(widths, need, np.arange(R) // (R // M), M, packing.ladder(10, 18, 3), 18 * 8, dp)
    order, offsets, q = _order(plan, dp)
    groups = _groups_per_minibatch(R, M, n)
    assert groups == 6 and _groups_per_minibatch(10, 2, 4) == 2 and _groups_per_minibatch(12, 2, 4) == 2
    prow, prep = (a.reshape(dp, q) for a in _prompt_slots(plan, offsets, q, dp, n, groups))
    order = order.reshape(dp, q)
    for micros, offs in zip(plan, offsets):
        for micro, c in zip(micros, offs):
            per = len(micro.rows) // dp
            for d in range(dp):
                rows = order[d, c:c + per]
                reps = prep[d, c:c + min(per, groups)]
                for i, r in enumerate(rows):
                    if r >= 0:  # the prompt slot's row is on this shard, in this micro-batch, of the same group
                        assert rows[reps[prow[d, c + i]]] // n == r // n


def test_all_zero_advantages_compute_nothing_and_still_apply_the_optimiser():
    batch = make_batch(seed=0)
    batch = batch._replace(rewards=np.ones_like(batch.rewards))  # every group all-correct: advantages 0
    model = toy_model()
    want, _, _ = _run(st.make_train_step, dataclasses.replace(BASE, packing="off"), model, _mesh1(), [batch])
    got, gm, fn = _run(make_packed_train_step, BASE, model, _mesh1(), [batch])
    assert gm[0]["microbatches"] == 0 and fn.programs.grad._cache_size() == 0
    assert gm[0]["rows_computed_frac"] == 0 and gm[0]["grad_norm"] == 0
    chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-7)  # weight decay moved both the same way


def test_head_only_at_trained_positions_equals_the_full_head():
    graphdef, params = tiny_model()
    b = make_batch(seed=3, prompt_len=6, completion_len=9)
    full = jax.jit(st.policy_logprobs, static_argnums=(0, 5, 6, 7))
    want = full(graphdef, params, b.tokens, b.positions, b.token_mask, 1.3, 0, 0)
    for chunk in (0, 4):
        got = full(graphdef, params, b.tokens, b.positions, b.token_mask, 1.3, chunk, 6)
        for w, g in zip(want, got):
            chex.assert_shape(g, w.shape)
            np.testing.assert_allclose(np.asarray(g)[:, 6:], np.asarray(w)[:, 6:], rtol=2e-5, atol=2e-5)
            assert np.all(np.asarray(g)[:, :6] == 0)


def test_sharded_packed_update_equals_single_device_padded_update():
    model = toy_model()
    cfg = dataclasses.replace(BASE, num_microbatches=1, max_tokens_per_microbatch=8 * 12)
    batches = [make_batch(seed=s) for s in (0, 1)]
    want, _, _ = _run(st.make_train_step, dataclasses.replace(cfg, packing="off"), model, _mesh1(), batches)
    for shape in [(1, 4, 2)]:  # data x fsdp: test_each_prompt_once_equals_the_padded_update (the decoder)
        got, _, fn = _run(make_packed_train_step, cfg, model, parallel.make_mesh(*shape), batches)
        assert _update_diff(model[1], want, got) < 2e-5, shape


def test_a_budget_below_the_longest_row_is_one_sentence_before_compiling():
    graphdef, params = toy_model()
    init, fn = make_packed_train_step(graphdef, dataclasses.replace(BASE, max_tokens_per_microbatch=11),
                                      _mesh1(), params)
    with pytest.raises(ValueError, match=r"^step.max_tokens_per_microbatch=11 is smaller than 1 row\(s\) of this "
                                         r"batch's full width 12 .* raise it to at least 12\.$"):
        fn(init(params), make_batch(seed=0))
    assert fn.programs.prelim._cache_size() == 0
    c = configs.get("passk_k4")
    c.step.max_tokens_per_microbatch, c.rollout.max_new_tokens = 20, 24
    with pytest.raises(ValueError, match=r"step.max_tokens_per_microbatch=20 is smaller than one row"):
        RunSpec.from_config(c, host_checks=False)
    with pytest.raises(ValueError, match=r"packing must be one of \('lengths', 'off'\)"):
        st.StepConfig(packing="segments").validate()
