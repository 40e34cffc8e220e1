"""The NNX decoder on its own: cached decoding == full forward, sharded == single device, remat, presets."""
import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from passk_jax import parallel
from passk_jax.models import transformer as T

# every code path at once: q/k/v biases (Qwen2) and q/k norm (Qwen3), head_dim != hidden / heads, GQA
CFG = T.ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=24, rope_theta=10000.0, family="qwen3", attention_bias=True,
                    qk_norm=True)
B, P, N = 8, 6, 3  # rows, prompt bucket, decoded tokens
LENGTHS = [6, 5, 4, 3, 6, 2, 1, 6]
_forward = jax.jit(T.forward, static_argnums=0)
_forward_donating = jax.jit(T.forward, static_argnums=0, donate_argnums=5)  # the cache is updated in place


def _left_padded(batch, prompt_len, total, lengths, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, CFG.vocab_size, (batch, total))
    mask = np.ones((batch, total), bool)
    for b, n in enumerate(lengths):
        mask[b, : prompt_len - n] = False
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
    return jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(mask)


def _decode(graphdef, params, tokens, positions, mask, cache):
    """Prefill the prompt bucket, then decode token by token: (prefill logits, [step logits], cache)."""
    logits, cache = _forward_donating(graphdef, params, tokens[:, :P], positions[:, :P], mask[:, :P], cache)
    steps = []
    for t in range(P, tokens.shape[1]):
        step, cache = _forward_donating(graphdef, params, tokens[:, t:t + 1], positions[:, t:t + 1], mask[:, t:t + 1],
                               cache)
        steps.append(step[:, 0])
    return logits, steps, cache


@pytest.fixture(scope="module")
def setup():
    graphdef, params = T.init(CFG, seed=1)
    # random (not unit/zero) norms and biases so every parameter matters
    rng = np.random.default_rng(2)  # numpy: no RNG program to compile
    params = jax.tree.map(lambda x: x + 0.1 * rng.standard_normal(x.shape, np.float32), params)
    batch = _left_padded(B, P, P + N, LENGTHS)
    full, _ = _forward(graphdef, params, *batch)
    return graphdef, params, batch, full


def test_cached_decoding_matches_full_forward(setup):
    graphdef, params, (tokens, positions, mask), full = setup
    empty = T.init_cache(CFG, B, P + N + 2)
    prefill, steps, cache = _decode(graphdef, params, tokens, positions, mask, empty)
    assert empty.k.is_deleted()  # donated
    valid = np.asarray(mask)
    assert int(cache.index) == P + N
    np.testing.assert_array_equal(np.asarray(cache.valid[:, :P + N]), valid)
    assert not np.asarray(cache.valid[:, P + N:]).any()
    errs = [np.abs(np.asarray(prefill - full[:, :P]))[valid[:, :P]].max()]
    errs += [np.abs(np.asarray(step - full[:, P + i])).max() for i, step in enumerate(steps)]
    print(f"cached decoding: max |cached - full| = {max(errs):.2e}")
    assert max(errs) <= 1e-5, errs


def test_chunked_prefill_and_bfloat16_cache(setup):
    graphdef, params, (tokens, positions, mask), full = setup
    _, cache = _forward(graphdef, params, tokens[:, :P], positions[:, :P], mask[:, :P], T.init_cache(CFG, B, P + N + 2))
    rest, _ = _forward(graphdef, params, tokens[:, P:], positions[:, P:], mask[:, P:], cache)
    np.testing.assert_allclose(np.asarray(rest), np.asarray(full[:, P:]), atol=1e-5)

    cache16 = T.init_cache(CFG, B, P + N + 2, dtype="bfloat16")
    assert cache16.k.dtype == jnp.bfloat16
    out16, _ = _forward(graphdef, params, tokens, positions, mask, cache16)
    scale = np.abs(np.asarray(full)).max()
    assert np.abs(np.asarray(out16 - full))[np.asarray(mask)].max() < 0.05 * scale


def test_padding_does_not_leak(setup):
    """Changing padded tokens changes no valid logit."""
    graphdef, params, (tokens, positions, mask), full = setup
    other, _ = _forward(graphdef, params, jnp.where(mask, tokens, 7), positions, mask)
    valid = np.asarray(mask)
    np.testing.assert_array_equal(np.asarray(other)[valid], np.asarray(full)[valid])


@pytest.mark.parametrize("mesh_shape", [dict(data=8), dict(data=1, fsdp=4, tensor=2)])
def test_sharded_forward_matches_single_device(setup, mesh_shape):
    graphdef, params, batch, full = setup
    mesh = parallel.make_mesh(**mesh_shape)
    sharded = parallel.shard_params(params, mesh)
    rows = parallel.logical_sharding(mesh, ("batch", "length"), batch[0].shape)
    tokens, positions, mask = (jax.device_put(x, rows) for x in batch)
    with jax.set_mesh(mesh):
        out, _ = _forward(graphdef, sharded, tokens, positions, mask)
    assert out.sharding.spec[0] == rows.spec[0] and rows.spec[0] is not None
    err = np.abs(np.asarray(out) - np.asarray(full))[np.asarray(mask)].max()
    print(f"sharded {mesh_shape}: max |sharded - single| = {err:.2e}")
    assert err <= 1e-5
    if mesh_shape.get("tensor") == 2:
        assert sharded["layers"]["gate_proj"].get_value().sharding.spec == jax.sharding.PartitionSpec(
            None, "fsdp", "tensor")
        cache = T.init_cache(CFG, B, P + N + 2)
        cache = jax.device_put(cache, T.cache_shardings(mesh, cache))
        assert cache.k.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
        with jax.set_mesh(mesh):
            _, steps, cache = _decode(graphdef, sharded, tokens, positions, mask, cache)
        assert cache.k.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
        assert max(np.abs(np.asarray(s - full[:, P + i])).max() for i, s in enumerate(steps)) <= 1e-5


def test_remat_policies_give_the_same_gradients():
    tokens, positions, mask = _left_padded(2, 6, 6, lengths=[6, 3])
    small = dataclasses.replace(CFG, hidden_size=32, intermediate_size=48, head_dim=8, num_layers=2)
    grads, jaxprs = {}, {}
    for policy in ("none", "full", "dots_saveable"):
        graphdef, params = T.init(dataclasses.replace(small, remat=policy))

        def loss(p, graphdef=graphdef):
            logits, _ = T.forward(graphdef, p, tokens, positions, mask)
            return jnp.sum(jnp.where(mask[..., None], jax.nn.log_softmax(logits), 0.0))

        jaxprs[policy] = str(jax.make_jaxpr(jax.grad(loss))(params))
        if policy != "dots_saveable":  # numerics of one policy suffice; the jaxpr shows each is wired in
            grads[policy] = jax.jit(jax.grad(loss))(params)
    assert "remat" not in jaxprs["none"]
    assert "nothing_saveable" in jaxprs["full"] and "DotsSaveable" in jaxprs["dots_saveable"]
    diff = jax.tree.map(lambda a, b: np.abs(np.asarray(a - b)).max(), grads["full"], grads["none"])
    assert max(jax.tree.leaves(diff)) <= 1e-5


def test_bfloat16_compute_gives_float32_logits(setup):
    graphdef, params, (tokens, positions, mask), full = setup
    graphdef16, _ = T.split(nnx.eval_shape(lambda: T.Transformer(dataclasses.replace(CFG, dtype="bfloat16"))))
    logits, _ = _forward(graphdef16, params, tokens, positions, mask)
    assert logits.dtype == jnp.float32 and jax.tree.leaves(params)[0].dtype == jnp.float32
    scale = np.abs(np.asarray(full)).max()
    assert np.abs(np.asarray(logits - full))[np.asarray(mask)].max() < 0.05 * scale


def test_presets_and_config_validation():
    tiny, small = T.ModelConfig.tiny(vocab_size=256), T.ModelConfig.small(vocab_size=256)
    assert 0.8e6 < tiny.num_params() < 1.2e6 and 20e6 < small.num_params() < 30e6
    abstract = nnx.eval_shape(lambda: T.Transformer(tiny))
    assert sum(x.size for x in jax.tree.leaves(nnx.state(abstract))) == tiny.num_params()
    assert T.ModelConfig.tiny(vocab_size=99).vocab_size == 99
    assert hash(dataclasses.replace(CFG, rope_scaling={"rope_type": "linear", "factor": 2.0})) is not None
    with pytest.raises(ValueError, match="num_kv_heads"):
        dataclasses.replace(CFG, num_kv_heads=3)
    with pytest.raises(ValueError, match="remat"):
        dataclasses.replace(CFG, remat="sometimes")
    with pytest.raises(ValueError, match="rope scaling type 'yarn'"):
        dataclasses.replace(CFG, rope_scaling={"rope_type": "yarn", "factor": 4.0})


def test_stacked_layers_keep_one_scan_in_the_program():
    """Depth does not unroll: the jaxpr has one scan whose body is independent of num_layers."""
    tokens, positions, mask = _left_padded(1, 4, 4, lengths=[4])
    sizes = []
    for layers in (2, 6):
        graphdef, params = T.split(nnx.eval_shape(lambda n=layers: T.Transformer(
            dataclasses.replace(CFG, num_layers=n))))
        jaxpr = jax.make_jaxpr(lambda p, g=graphdef: T.forward(g, p, tokens, positions, mask))(params)
        sizes.append(len(str(jaxpr)))
    assert sizes[0] == sizes[1]


def test_unrolled_layers_match_the_scan(setup):
    """scan_layers=False (the CPU default of the trainer) computes the same logits, cache and gradients."""
    graphdef, params, (tokens, positions, mask), full = setup
    unrolled = dataclasses.replace(CFG, scan_layers=False)
    graphdef_u, _ = T.split(nnx.eval_shape(lambda: T.Transformer(unrolled)))
    valid = np.asarray(mask)
    logits, _ = _forward(graphdef_u, params, tokens, positions, mask)
    assert np.abs(np.asarray(logits - full))[valid].max() <= 1e-5
    _, steps, _ = _decode(graphdef_u, params, tokens, positions, mask, T.init_cache(unrolled, B, P + N))
    assert max(np.abs(np.asarray(s - full[:, P + i])).max() for i, s in enumerate(steps)) <= 1e-5

    def loss(p, g):
        out, _ = T.forward(g, p, tokens, positions, mask)
        return jnp.sum(jnp.where(mask[..., None], jax.nn.log_softmax(out), 0.0))

    g_scan = jax.jit(jax.grad(loss), static_argnums=1)(params, graphdef)
    g_unrolled = jax.jit(jax.grad(loss), static_argnums=1)(params, graphdef_u)
    diff = jax.tree.map(lambda a, b: np.abs(np.asarray(a - b)).max() / (np.abs(np.asarray(a)).max() + 1e-12),
                        g_scan, g_unrolled)
    assert max(jax.tree.leaves(diff)) <= 1e-5


@pytest.mark.parametrize("scan_layers", [True, False])
def test_shared_prefix_decoding_matches_full_forward(scan_layers):
    """n continuations of each of G prompts, decoded from ONE prompt cache per prompt (``prefix=``) plus a
    per-row continuation cache, give the full forward's logits of [prompt ; continuation]."""
    cfg = dataclasses.replace(CFG, scan_layers=scan_layers)
    graphdef, params = T.init(cfg, seed=3)
    G, n = 3, 2
    prompts, prompt_pos, prompt_mask = _left_padded(G, P, P, lengths=[6, 2, 4], seed=4)
    cont = jnp.asarray(np.random.default_rng(5).integers(0, CFG.vocab_size, (G * n, N)))
    tokens = jnp.concatenate([jnp.repeat(prompts, n, 0), cont], 1)
    mask = jnp.concatenate([jnp.repeat(prompt_mask, n, 0), jnp.ones((G * n, N), bool)], 1)
    positions = jnp.maximum(jnp.cumsum(mask, 1) - 1, 0)
    full, _ = _forward(graphdef, params, tokens, positions, mask)

    _, prefix = _forward(graphdef, params, prompts, prompt_pos, prompt_mask, T.init_cache(cfg, G, P))
    cache, errs = T.init_cache(cfg, G * n, N), []
    step_fn = jax.jit(lambda p, tok, pos, m, c, pre: T.forward(graphdef, p, tok, pos, m, c, prefix=pre))
    for t in range(N):
        step, cache = step_fn(params, cont[:, t:t + 1], positions[:, P + t:P + t + 1], mask[:, P + t:P + t + 1],
                              cache, prefix)
        errs.append(float(jnp.max(jnp.abs(step[:, 0] - full[:, P + t]))))
    assert int(cache.index) == N and max(errs) <= 1e-5, errs
    with pytest.raises(ValueError, match="prefix"):
        T.forward(graphdef, params, cont[:, :1], positions[:, P:P + 1], mask[:, P:P + 1], prefix=prefix)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_prompts_once_training_forward_matches_full_forward_and_gradients(scan_layers):
    """Training over shared prompts: the prompts' keys/values (``kv_out=True``) then the rows' continuations
    (``prefix=``, rows in any order, flat or per-shard ``prefix_rows``) give the full forward's logits at the
    continuation's positions, and the same parameter gradients (the prompt's is the sum over its rows)."""
    cfg = dataclasses.replace(CFG, scan_layers=scan_layers)
    graphdef, params = T.init(cfg, seed=3)
    rng = np.random.default_rng(6)
    prompts, prompt_pos, prompt_mask = _left_padded(4, P, P, lengths=[6, 2, 4, 5], seed=7)
    rows = np.array([2, 0, 2, 0, 3, 3, 1, 3])  # row b continues prompt rows[b]
    cont = jnp.asarray(rng.integers(0, CFG.vocab_size, (len(rows), N)))
    cont_mask = jnp.asarray(np.arange(N)[None] < rng.integers(1, N + 1, (len(rows), 1)))  # right padding
    cont_pos = jnp.asarray(prompt_pos[rows, -1:] + 1 + np.arange(N))
    tokens, mask = jnp.concatenate([prompts[rows], cont], 1), jnp.concatenate([prompt_mask[rows], cont_mask], 1)
    positions = jnp.concatenate([prompt_pos[rows], cont_pos], 1)
    weight = jnp.asarray(rng.standard_normal((len(rows), N, CFG.vocab_size)), jnp.float32) * cont_mask[..., None]

    def full(p):
        return T.forward(graphdef, p, tokens, positions, mask)[0][:, P:]

    def shared(p, prefix_rows, order=slice(None)):
        _, pre = T.forward(graphdef, p, prompts[order], prompt_pos[order], prompt_mask[order], head=False,
                           kv_out=True)
        chex.assert_shape(pre.k, (cfg.num_layers, 4, cfg.num_kv_heads, P, cfg.head_dim))
        return T.forward(graphdef, p, cont, cont_pos, cont_mask, prefix=pre, prefix_rows=prefix_rows)[0]

    # per shard (2 groups of 4 rows, each reading its own 2 prompts): prompts reordered so each shard's are local
    order = np.array([2, 0, 3, 1])
    local = np.array([[0, 1, 0, 1], [0, 0, 1, 0]])  # shard 0 rows -> prompts (2, 0) | shard 1 -> (3, 1)
    assert (order.reshape(2, 2)[np.arange(2)[:, None], local].ravel() == rows).all()
    loss = lambda f: lambda p: jnp.sum(jnp.tanh(f(p)) * weight)  # noqa: E731
    want, want_g = jax.jit(jax.value_and_grad(loss(full)))(params)
    forms = ((jnp.asarray(rows), {}), (jnp.asarray(local), {"order": order}))
    for prefix_rows, kw in forms[:2 if scan_layers else 1]:  # the loss weighs every valid logit at random
        got_l, got_g = jax.jit(jax.value_and_grad(loss(lambda p: shared(p, prefix_rows, **kw))))(params)
        np.testing.assert_allclose(got_l, want, rtol=1e-5)
        chex.assert_trees_all_close(got_g, want_g, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="without a cache, with prefix_rows"):
        T.forward(graphdef, params, cont, cont_pos, cont_mask, prefix=T.Prefix(jnp.zeros(1), jnp.zeros(1), mask))
