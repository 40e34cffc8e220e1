"""The train step with the real decoder: fsdp 4 x tensor 2 on 8 virtual devices == one device."""
import chex
import jax
import numpy as np

from passk_jax import parallel
from passk_jax.rl import step as st
from passk_jax.rl.batch import batch_shardings
from tests.rl.helpers import make_batch, tiny_model
from tests.rl.test_step import BASE


def _run(mesh, graphdef, params):
    init, train_step = st.make_train_step(graphdef, BASE, mesh, params)
    state = init(params, jax.random.PRNGKey(3))
    metrics = []
    for seed in (0, 1):
        state, m = train_step(state, jax.device_put(make_batch(seed=seed), batch_shardings(mesh)))
        metrics.append(jax.tree.map(np.asarray, m))
    return jax.tree.map(np.asarray, state.params), metrics, train_step


def test_transformer_step_fsdp_tensor_equals_single_device():
    graphdef, params = tiny_model()
    ref_params, ref_metrics, _ = _run(parallel.make_mesh(1, 1, 1, devices=jax.devices()[:1]), graphdef, params)
    got_params, got_metrics, step = _run(parallel.make_mesh(1, 4, 2), graphdef, params)
    assert step._cache_size() == 1
    # float32, "highest" matmuls: sharding reorders sums only (~1e-7 relative); Adam eps 1e-4 (see BASE)
    chex.assert_trees_all_close(got_params, ref_params, rtol=1e-5, atol=1e-6)
    for mg, mr in zip(got_metrics, ref_metrics):
        for name in mr:
            np.testing.assert_allclose(mg[name], mr[name], rtol=1e-5, atol=1e-6, err_msg=name)
    moved = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(ref_params), jax.tree.leaves(params)))
    assert moved > 1e-4
    assert ref_metrics[0]["clip_low_frac"] + ref_metrics[0]["clip_high_frac"] >= 0
    assert np.isfinite(ref_metrics[1]["loss"]) and ref_metrics[1]["grad_norm"] > 0


def test_chunked_logprobs_step_equals_full_logits():
    """logprob_chunk > 0 (no [rows, S, V] logits) trains exactly like the full-logits step, recomputed old
    log-probs included."""
    import dataclasses

    graphdef, params = tiny_model()
    mesh = parallel.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    out = {}
    for chunk in (0, 5):
        cfg = dataclasses.replace(BASE, logprob_chunk=chunk, old_logprobs="recompute")
        init, train_step = st.make_train_step(graphdef, cfg, mesh, params)
        state, m = train_step(init(params, jax.random.PRNGKey(3)),
                              jax.device_put(make_batch(seed=0), batch_shardings(mesh)))
        out[chunk] = jax.tree.map(np.asarray, (state.params, m))
    chex.assert_trees_all_close(out[5], out[0], rtol=1e-5, atol=1e-6)
