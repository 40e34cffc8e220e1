"""LoRA in the train step: the base stays bitwise frozen, only the adapters have optimiser state and move, the
packed update equals the padded one, and sharded equals one device."""
import dataclasses

import chex
import jax
import numpy as np

from passk_jax import parallel
from passk_jax.models import lora as L
from passk_jax.rl import step as st
from passk_jax.rl.batch import batch_shardings
from passk_jax.rl.packed_step import make_packed_train_step
from tests.rl.helpers import CFG, make_batch, tiny_model
from tests.rl.test_step import BASE

LCFG = L.LoraConfig(rank=4, alpha=8.0)


def _lora_params(params):
    return L.LoraParams(params, L.init_adapters(CFG, LCFG, jax.random.PRNGKey(7)), LCFG.scale)


def _run(make, cfg, mesh, graphdef, params, steps=2):
    init, train_step = make(graphdef, cfg, mesh, params)
    state = init(params, jax.random.PRNGKey(3))
    metrics = []
    for seed in range(steps):
        state, m = train_step(state, jax.device_put(make_batch(seed=seed, shared_prompts=True), batch_shardings(mesh)))
        metrics.append(jax.tree.map(np.asarray, {k: v for k, v in m.items() if np.ndim(v) == 0}))
    return jax.tree.map(np.asarray, state), metrics


def test_base_frozen_adapters_trained_optimizer_on_adapters_only(make=st.make_train_step):
    graphdef, params = tiny_model()
    lp = _lora_params(params)
    mesh = parallel.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    state, metrics = _run(make, BASE, mesh, graphdef, lp)
    chex.assert_trees_all_equal(state.params.base, jax.tree.map(np.asarray, params))  # bitwise frozen
    moved = max(float(np.abs(a - b).max()) for a, b in
                zip(jax.tree.leaves(state.params.adapters), jax.tree.leaves(lp.adapters)))
    assert moved > 1e-4
    adam = [s for s in jax.tree.leaves(state.opt_state, is_leaf=lambda x: hasattr(x, "mu")) if hasattr(s, "mu")]
    assert adam and all(jax.tree.structure(s.mu) == jax.tree.structure(lp.adapters) for s in adam)
    assert state.ref_params is None
    # (at B = 0 the adapted model is the base exactly: tests/models/test_lora.py)
    assert np.isfinite(metrics[1]["loss"]) and metrics[1]["grad_norm"] > 0


def test_packed_lora_update_equals_padded_with_kl_against_the_base():
    """KL on (nothing skipped; the reference is the base model, no copy): the packed LoRA update, each prompt
    run once per micro-batch, equals the padded one to float32 summation order."""
    graphdef, params = tiny_model()
    cfg = dataclasses.replace(BASE, kl_coef=0.05, old_logprobs="recompute")
    mesh = parallel.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    padded, pm = _run(st.make_train_step, cfg, mesh, graphdef, _lora_params(params))
    packed, km = _run(make_packed_train_step, cfg, mesh, graphdef, _lora_params(params))
    chex.assert_trees_all_close(packed.params.adapters, padded.params.adapters, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_equal(packed.params.base, jax.tree.map(np.asarray, params))  # bitwise frozen
    for a, b in zip(km, pm):
        np.testing.assert_allclose(a["kl"], b["kl"], rtol=1e-5, atol=1e-7)
    assert pm[1]["kl"] > 0 and km[1]["positions_frac"] < 1.0  # every row computed, each prompt once


def test_sharded_lora_step_equals_one_device(shape=(2, 2, 2)):  # (2, 4, 1): the forward, tests/models/test_lora.py
    graphdef, params = tiny_model()
    one, _ = _run(st.make_train_step, BASE, parallel.make_mesh(1, 1, 1, devices=jax.devices()[:1]), graphdef,
                  _lora_params(params))
    got, _ = _run(st.make_train_step, BASE, parallel.make_mesh(*shape), graphdef, _lora_params(params))
    chex.assert_trees_all_close(got.params.adapters, one.params.adapters, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_equal(got.params.base, one.params.base)
