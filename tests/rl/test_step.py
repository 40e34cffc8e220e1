"""The jitted, sharded train step: exact accumulation, mesh invariance, in-graph advantages, one compile.

Most checks run on ``ToyLM`` (the transformer's calling convention and logical axes, a fraction of its compile
time); ``test_step_transformer.py`` repeats the mesh check with the real decoder.
"""
import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from passk_jax import advantages, optim, parallel
from passk_jax.models import transformer as T
from passk_jax.rl import losses
from passk_jax.rl import step as st
from passk_jax.rl.batch import batch_shardings
from tests.rl.helpers import CFG, make_batch, toy_model

# Adam's first update is lr * g / (|g| + eps): with eps = 1e-8 a gradient entry that is ~0 up to rounding can
# flip sign between two summation orders and move a parameter by 2 lr. eps = 1e-4 keeps the update a smooth
# function of the gradient, so mesh/partition comparisons test the step, not the sign of rounding noise.
BASE = st.StepConfig(estimator="passk_analytic", k=2, learning_rate=1e-3, warmup_steps=2, adam_eps=1e-4,
                     num_minibatches=2, num_microbatches=2, grad_clip_norm=1.0, weight_decay=0.01)
MESHES = [(8, 1, 1), (2, 4, 1), (1, 4, 2)]


def _one_device_mesh():
    return parallel.make_mesh(1, 1, 1, devices=jax.devices()[:1])


def _np(tree):
    return jax.tree.map(lambda x: np.array(x), tree)


# ----------------------------------------------------------------------------- config / batch arithmetic
def test_batch_arithmetic_is_validated_with_one_sentence():
    mesh8 = parallel.make_mesh(8, 1, 1)
    cfg = dataclasses.replace(BASE, num_minibatches=3)
    with pytest.raises(ValueError, match=r"num_prompts P=8 is not divisible by num_minibatches=3\."):
        st.validate_batch(cfg, 8, 4, 32)
    with pytest.raises(ValueError, match=r"num_microbatches=3"):
        st.validate_batch(dataclasses.replace(BASE, num_minibatches=1, num_microbatches=3), 8, 4, 32)
    with pytest.raises(ValueError, match=r"data-parallel size data\*fsdp=8"):
        st.validate_batch(dataclasses.replace(BASE, num_microbatches=4), 8, 4, 32, mesh8)
    with pytest.raises(ValueError, match=r"rows"):
        st.validate_batch(BASE, 8, 4, 30)
    with pytest.raises(ValueError, match=r"k=8 exceeds"):
        st.validate_batch(dataclasses.replace(BASE, k=8), 8, 4, 32)
    with pytest.raises(ValueError, match=r"unknown step config field\(s\) \['eps_hi'\]"):
        st.StepConfig.from_dict({"eps_hi": 0.3})
    with pytest.raises(ValueError, match="not registered"):
        st.StepConfig(estimator="passk").validate()
    st.validate_batch(BASE, 8, 4, 32, mesh8)


def test_learning_rate_schedule():
    f = optim.learning_rate_schedule(st.StepConfig(learning_rate=1.0, warmup_steps=4))
    np.testing.assert_allclose([f(u) for u in range(6)], [0.25, 0.5, 0.75, 1.0, 1.0, 1.0])
    g = optim.learning_rate_schedule(st.StepConfig(learning_rate=1.0, warmup_steps=2, lr_schedule="cosine",
                                                total_updates=6, final_lr_ratio=0.1))
    np.testing.assert_allclose([g(u) for u in (0, 2, 4, 6, 9)], [0.5, 1.0, 0.55, 0.1, 0.1], rtol=1e-6)


def test_weight_decay_mask_skips_norms_and_biases():
    _, params = T.split(nnx.eval_shape(lambda: T.Transformer(CFG)))
    mask = optim.weight_decay_mask(params)
    flags = {jax.tree_util.keystr(p): m for p, m in jax.tree_util.tree_leaves_with_path(mask)}
    assert [k for k, v in flags.items() if not v] == [
        k for k in flags if any(s in k for s in ("norm", "bias"))]
    assert flags["['layers']['q_proj'].value"] and flags["['embed_tokens'].value"]
    assert not flags["['layers']['input_norm'].value"]  # stacked [layers, hidden]: 2-D but not decayed


def test_group_pass_at_k_and_pass_hat_k_are_unbiased():
    correct = jnp.array([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]], bool)
    valid = jnp.array([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]], bool)
    # 1 - C(n-c, k)/C(n, k) with k = 2: 1 - 3/6; 1 - 0; 0; n=1 < k -> any correct
    np.testing.assert_allclose(st.group_pass_at_k(correct, valid, 2), [0.5, 1.0, 0.0, 1.0], rtol=1e-6)
    # pass^k = C(c, k)/C(n, k), k = 2: 0/6; 1/3; 0; n=1 < k -> all (the one) correct
    np.testing.assert_allclose(st.group_pass_hat_k(correct, valid, 2), [0.0, 1 / 3, 0.0, 1.0], rtol=1e-6)


# ----------------------------------------------------------------------------- exact accumulation
_logprobs = jax.jit(st.policy_logprobs, static_argnums=0)


def _full_minibatch(batch, cfg, params, graphdef):
    """The whole batch as one mini-batch with recomputed old log-probs (perturbed, so that some clip)."""
    R = batch.tokens.shape[0]
    lp, _ = _logprobs(graphdef, params, batch.tokens, batch.positions, batch.token_mask)
    mask = batch.loss_mask & batch.token_mask & batch.valid.reshape(R)[:, None]
    adv = np.asarray(advantages.compute(cfg.estimator, batch.rewards, batch.valid, k=cfg.k)).reshape(R)
    old = np.asarray(lp) + 0.3 * np.random.default_rng(0).normal(size=lp.shape).astype(np.float32)
    return {"tokens": batch.tokens, "positions": batch.positions, "token_mask": batch.token_mask,
            "mask": mask, "old_logp": old, "adv": adv, "sampler_logp": batch.sampler_logprobs}


@pytest.mark.parametrize("aggregation", losses.AGGREGATIONS)
def test_microbatch_accumulation_equals_one_big_batch(aggregation):
    graphdef, params = toy_model()
    batch = make_batch()
    cfg = dataclasses.replace(BASE, aggregation=aggregation, dual_clip=3.0)
    full = _full_minibatch(batch, cfg, params, graphdef)

    def reference(params, full):  # the loss of the whole mini-batch written directly, no micro-batching
        lp, ent = st.policy_logprobs(graphdef, params, full["tokens"], full["positions"], full["token_mask"])
        tok, _ = losses.per_token_objective(lp, full["old_logp"], full["adv"][:, None], full["mask"],
                                            dual_clip=3.0, entropy=ent)
        return losses.finalize(*losses.aggregate(tok, full["mask"], aggregation))

    want_loss, want_grads = jax.jit(jax.value_and_grad(reference))(params, full)
    loss_and_grads = jax.jit(st.make_loss_and_grads(graphdef, cfg))
    flat = lambda t: jnp.concatenate([x.ravel() for x in jax.tree.leaves(t)])  # noqa: E731
    for K in (2, 8) if aggregation == "token_mean" else (4,):
        mb = {k: v.reshape((K, v.shape[0] // K) + v.shape[1:]) for k, v in full.items()}
        loss, grads, sums = loss_and_grads(params, mb)
        # float32: a different micro-batch split only reorders sums (a normalisation bug would be >= 1e-2)
        np.testing.assert_allclose(loss, want_loss, rtol=1e-6, atol=1e-7)
        g, w = flat(grads), flat(want_grads)
        assert float(jnp.linalg.norm(g - w) / jnp.linalg.norm(w)) <= 1e-6, K
    assert float(sums["clip_low"] + sums["clip_high"] + sums["clip_dual"]) > 0  # clipped branches exercised


# ----------------------------------------------------------------------------- mesh invariance
@pytest.fixture(scope="module")
def runs():
    """Two steps of the same config on one device and on each 8-device mesh."""
    graphdef, params = toy_model()
    out = {}
    for shape in [(1, 1, 1)] + MESHES:
        mesh = _one_device_mesh() if shape == (1, 1, 1) else parallel.make_mesh(*shape)
        init, train_step = st.make_train_step(graphdef, BASE, mesh, params)
        state = init(params, jax.random.PRNGKey(3))
        metrics = []
        for seed in (0, 1):
            b = jax.device_put(make_batch(seed=seed), batch_shardings(mesh))
            state, m = train_step(state, b)
            metrics.append(_np(m))
        out[shape] = dict(state=state, params=_np(state.params), metrics=metrics, step=train_step, mesh=mesh)
    return out


@pytest.mark.parametrize("shape", MESHES)
def test_sharded_step_equals_single_device(runs, shape):
    # fp32 with "highest" matmuls: sharding only reorders sums (~1e-7 relative); two steps of 2 AdamW updates
    # each at lr 1e-3 keep parameter differences orders of magnitude below 1e-5.
    ref, got = runs[(1, 1, 1)], runs[shape]
    chex.assert_trees_all_close(got["params"], ref["params"], rtol=1e-5, atol=1e-6)
    for mg, mr in zip(got["metrics"], ref["metrics"]):
        for name in mr:
            np.testing.assert_allclose(mg[name], mr[name], rtol=1e-5, atol=1e-6, err_msg=name)
    leaf = jax.tree.leaves(got["state"].params)[0]
    assert len(leaf.sharding.device_set) == 8


def test_params_moved_and_metrics_are_sane(runs):
    ref = runs[(1, 1, 1)]
    m = ref["metrics"][0]
    graphdef, params0 = toy_model()
    moved = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(ref["params"]),
                                                         jax.tree.leaves(_np(params0))))
    assert 1e-4 < moved < 1e-2, moved
    batch = make_batch(seed=0)
    assert m["adv_zero_prompt_frac"] >= 2 / 8  # the all-0 and the all-1 prompt
    np.testing.assert_allclose(m["reward_mean"], batch.rewards[batch.valid].mean(), rtol=1e-6)
    lengths = batch.loss_mask.sum(1)[batch.valid.reshape(-1)]
    np.testing.assert_allclose([m["response_length_mean"], m["response_length_max"], m["response_length_min"]],
                               [lengths.mean(), lengths.max(), lengths.min()], rtol=1e-6)
    assert m["sampler_lp_diff_max"] > m["sampler_lp_diff_mean"] > 0
    np.testing.assert_allclose(m["lr"], 1e-3, rtol=1e-6)  # the 2nd update ends the 2 warm-up updates
    assert 0 < m["entropy"] <= np.log(64) + 1e-5 and m["grad_norm"] > 0


def test_in_graph_advantages_equal_standalone_kernel(runs):
    for i, seed in enumerate((0, 1)):
        batch = make_batch(seed=seed)
        want = advantages.compute("passk_analytic", jnp.asarray(batch.rewards), jnp.asarray(batch.valid), k=2)
        np.testing.assert_allclose(runs[(1, 1, 1)]["metrics"][i]["advantages"], want, rtol=1e-6, atol=1e-7)


def test_one_compilation_and_no_host_transfer(runs):
    run = runs[(2, 4, 1)]
    train_step, state = run["step"], run["state"]
    shardings = batch_shardings(run["mesh"])
    batches = [jax.device_put(make_batch(seed=s), shardings) for s in (5, 6, 7)]
    with jax.transfer_guard("disallow"):  # device-resident state and batch: nothing crosses to or from host
        for b in batches:
            state, metrics = train_step(state, b)
    assert train_step._cache_size() == 1  # five steps, new batch values each time, one trace + compilation
    assert int(state.step) == 5
    assert np.isfinite(float(metrics["loss"]))


# ----------------------------------------------------------------------------- entropy-adaptive, KL, GSPO
def test_entropy_adaptive_uses_in_graph_entropy_and_kl_starts_at_zero():
    graphdef, params = toy_model(seed=4)
    batch = make_batch(seed=2)
    cfg = dataclasses.replace(BASE, estimator="entropy_adaptive", k=2, num_minibatches=1, num_microbatches=2,
                              kl_coef=0.1, entropy_coef=0.01, temperature=0.8, ratio_level="sequence")
    init, train_step = st.make_train_step(graphdef, cfg, _one_device_mesh(), params)
    state = init(params)
    assert state.ref_params is not None
    ptrs = {x.unsafe_buffer_pointer() for x in jax.tree.leaves((state.params, state.ref_params))}
    assert len(ptrs) == 2 * len(jax.tree.leaves(params))  # the reference is a copy, not an alias
    state, m = train_step(state, batch)

    # independent per-prompt mean token entropy of softmax(logits / 0.8) over valid completion tokens
    logits, _ = jax.jit(T.forward, static_argnums=0)(graphdef, params, jnp.asarray(batch.tokens), jnp.asarray(batch.positions),
                          jnp.asarray(batch.token_mask))
    z = np.asarray(logits, np.float64)[:, :-1] / 0.8
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    ent = -(p * np.log(p)).sum(-1)
    P, n = batch.rewards.shape
    mask = (batch.loss_mask & batch.valid.reshape(-1)[:, None])[:, 1:]
    want_ent = np.array([ent[i * n:(i + 1) * n][mask[i * n:(i + 1) * n]].mean() for i in range(P)])
    np.testing.assert_allclose(m["prompt_entropy"], want_ent, rtol=1e-5)
    want = advantages.compute("entropy_adaptive", jnp.asarray(batch.rewards), jnp.asarray(batch.valid), k=2,
                              entropy=jnp.asarray(want_ent, jnp.float32))
    np.testing.assert_allclose(m["advantages"], want, rtol=1e-6, atol=1e-7)
    assert abs(float(m["kl"])) < 1e-6  # reference == policy before the first update
    state, m2 = train_step(state, batch)
    assert float(m2["kl"]) > 0


def test_k_schedule_values_and_stages(tmp_path):
    """k-annealing: piecewise-linear knots rounded half up, constant after the last knot, counted from the
    start of each stage; ``at(step)`` is the plain configuration the compiled step of that step uses."""
    cfg = st.StepConfig(estimator="pkpo", k=8, k_schedule=[[0, 8], [4, 8], [10, 1]])  # lists, as from JSON
    assert cfg.k_schedule == ((0, 8), (4, 8), (10, 1)) and cfg.ks == (1, 8)
    assert [cfg.k_at(t) for t in range(13)] == [8, 8, 8, 8, 8, 7, 6, 5, 3, 2, 1, 1, 1]
    assert cfg.at(6) == dataclasses.replace(cfg, k=6, k_schedule=()) and st.StepConfig().at(5) == st.StepConfig()
    from tests.rl.test_trainer import tiny_spec

    spec = tiny_spec(tmp_path, **{"train.stages": (
        {"steps": 2, "step": {"estimator": "grpo", "k": 1}},
        {"steps": 3, "step": {"estimator": "pkpo", "k": 3, "k_schedule": ((0, 3), (2, 1))}})})
    assert [spec.step_at(t)[0] for t in range(5)] == [0, 0, 1, 1, 1]
    assert [spec.step_at(t)[1].k for t in range(5)] == [1, 1, 3, 2, 1]
