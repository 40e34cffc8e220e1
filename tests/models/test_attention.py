"""The blocked causal attention kernel against the plain one: values, gradients, sharding, block plans."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from passk_jax import parallel
from passk_jax.models import attention as A
from passk_jax.models import transformer as T


def _inputs(B, S, H, KV, hd, seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.normal(size=shape), dtype) for shape in
               ((B, S, H, hd), (B, KV, S, hd), (B, KV, S, hd)))
    # left padding of random width plus random holes; the last position is always a real token
    token_mask = (np.arange(S)[None] >= rng.integers(0, max(1, S // 3), (B, 1))) & (rng.uniform(size=(B, S)) > 0.15)
    token_mask[:, -1] = True
    t = np.arange(S)
    mask = jnp.asarray((t[None, :] <= t[:, None])[None] & token_mask[:, None, :])
    seen = jnp.any(mask, -1)[:, :, None, None]  # queries with at least one visible key
    weights = jnp.asarray(rng.normal(size=(B, S, H, hd)), jnp.float32)
    return q, k, v, mask, jnp.asarray(token_mask), seen, weights


def _loss(kernel, mask, seen, weights):
    return lambda q, k, v: jnp.sum(jnp.where(seen, kernel(q, k, v, mask), 0.0).astype(jnp.float32) * weights)


@pytest.mark.parametrize("shape,key_block", [((1, 1, 2, 1, 4), None), ((3, 5, 2, 1, 4), None),
                                             ((6, 37, 6, 2, 8), None), ((32, 152, 4, 2, 32), None),
                                             ((7, 100, 4, 4, 16), None), ((1, 300, 2, 1, 8), None),
                                             ((3, 5, 2, 1, 4), 4), ((2, 100, 4, 2, 16), 16),
                                             ((1, A.LONG_FROM + 5, 2, 1, 8), None)])
def test_blocked_matches_plain(shape, key_block):
    """Outputs where a query sees a key, and all three input gradients, equal the plain kernel's to float32
    rounding (relative 1e-5: the blocked kernel sums the same terms in another order), for the query-chunked
    tiling and for the key-blocked one (forced by ``key_block``, or a row longer than ``LONG_FROM``; sequences
    that are not a multiple of the tile are padded)."""
    q, k, v, mask, valid, seen, w = _inputs(*shape)
    kernel = lambda q, k, v, valid: A.blocked_causal(q, k, v, valid, key_block)  # noqa: E731
    ref, out = A.plain(q, k, v, mask), jax.jit(kernel)(q, k, v, valid)
    np.testing.assert_allclose(np.where(seen, out, 0), np.where(seen, ref, 0), atol=2e-6, rtol=1e-5)
    g_ref = jax.grad(_loss(A.plain, mask, seen, w), (0, 1, 2))(q, k, v)
    g_out = jax.jit(jax.grad(_loss(kernel, valid, seen, w), (0, 1, 2)))(q, k, v)
    for a, b in zip(g_out, g_ref):
        assert float(jnp.max(jnp.abs(a - b))) <= 1e-5 * float(jnp.max(jnp.abs(b)))


@pytest.mark.parametrize("key_block", [None, 16])
def test_blocked_bfloat16_close_to_plain(key_block):
    q, k, v, mask, valid, seen, _ = _inputs(4, 50, 4, 2, 16, dtype=jnp.bfloat16)
    ref = A.plain(q, k, v, mask).astype(jnp.float32)
    out = jax.jit(A.blocked_causal, static_argnums=4)(q, k, v, valid, key_block)
    assert out.dtype == jnp.bfloat16
    assert float(jnp.max(jnp.abs(jnp.where(seen, out.astype(jnp.float32) - ref, 0)))) <= 0.05  # 8 mantissa bits


def test_blocked_needs_self_attention_shapes():
    q, k, v, _, valid, _, _ = _inputs(2, 6, 2, 1, 4)
    with pytest.raises(ValueError, match="as many keys as queries"):
        A.blocked_causal(q, k[:, :, :4], v[:, :, :4], valid)
    with pytest.raises(ValueError, match=r"validity as bool\[2, 6\]"):
        A.blocked_causal(q, k, v, valid[:, None, :] & valid[:, :, None])


def _temp_bytes(S, key_block=None, grad=True):
    """Temporary bytes XLA plans for the kernel (and its gradient) on one row of S positions."""
    q = jax.ShapeDtypeStruct((1, S, 2, 16), jnp.float32)
    kv = jax.ShapeDtypeStruct((1, 1, S, 16), jnp.float32)
    valid = jax.ShapeDtypeStruct((1, S), jnp.bool_)
    f = lambda q, k, v, m: jnp.sum(A.blocked_causal(q, k, v, m, key_block))  # noqa: E731
    fn = jax.grad(f, (0, 1, 2)) if grad else f
    return jax.jit(fn).lower(q, kv, kv, valid).compile().memory_analysis().temp_size_in_bytes


def test_blocked_memory_is_linear_in_the_sequence():
    """The compiled program's temporaries grow linearly with the row length past ``LONG_FROM`` (the key-blocked
    tiles): doubling S at most doubles them (plus a tile), and at 4x ``LONG_FROM`` they are far below one
    [S, S] float32 score matrix per head (the quadratic kernel's footprint)."""
    S = 2 * A.LONG_FROM
    t1, t2 = _temp_bytes(S), _temp_bytes(2 * S)
    tile = 2 * A.KEY_BLOCK * A.KEY_BLOCK * 4
    assert t2 <= 2 * t1 + 4 * tile, (t1, t2)
    assert t2 < (2 * S) ** 2 * 4 / 8, (t2, (2 * S) ** 2 * 4)


@pytest.mark.parametrize("batch,seq,heads,shards", [(128, 152, 4, 1), (128, 152, 8, 8), (6, 37, 6, 4),
                                                    (1, 1, 1, 1), (96, 2048, 14, 2), (10, 80, 2, 4),
                                                    (8, 30720, 28, 8), (3, 4100, 4, 1)])
def test_block_plan(batch, seq, heads, shards):
    rows, tiling = A.blocked_plan(batch, seq, heads, shards)
    assert batch % rows == 0
    if batch % shards == 0:
        assert rows % shards == 0  # every device gets the same number of rows of each block
    if seq > A.LONG_FROM:
        assert tiling == A.KEY_BLOCK
        return
    assert tiling[0][0] == 0 and tiling[-1][1] == seq and len(tiling) <= A._MAX_CHUNKS
    assert all(a[1] == b[0] for a, b in zip(tiling, tiling[1:]))


@pytest.mark.parametrize("mesh_shape,key_block", [(dict(data=8), None), (dict(data=2, fsdp=4), None),
                                                  (dict(data=1, fsdp=4, tensor=2), None), (dict(data=2, fsdp=4), 8)])
def test_blocked_sharded_matches_single_device(mesh_shape, key_block):
    q, k, v, mask, valid, seen, w = _inputs(16, 40, 4, 2, 8, seed=3)
    mesh = parallel.make_mesh(**mesh_shape)
    put = lambda x, axes: jax.device_put(x, parallel.logical_sharding(mesh, axes, x.shape))  # noqa: E731
    qs = put(q, ("batch", "length", "heads", "head_dim"))
    ks, vs = (put(x, ("batch", "kv_heads", "length", "head_dim")) for x in (k, v))
    valid_s = put(valid, ("batch", "length"))
    kernel = lambda q, k, v, valid: A.blocked_causal(q, k, v, valid, key_block)  # noqa: E731
    grad = jax.jit(jax.value_and_grad(_loss(kernel, valid, seen, w), (0, 1, 2)))
    (val, g) = grad(q, k, v)
    with jax.set_mesh(mesh):
        sharded = jax.jit(jax.value_and_grad(_loss(kernel, valid_s, seen, w), (0, 1, 2)))
        (val_s, g_s) = sharded(qs, ks, vs)
    np.testing.assert_allclose(float(val_s), float(val), rtol=1e-5)
    for a, b in zip(g_s, g):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_model_kernels_agree_and_config_is_validated():
    cfg = dataclasses.replace(T.ModelConfig.tiny(), num_layers=2, scan_layers=False)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(1, 256, (4, 20)), jnp.int32)
    mask = jnp.asarray(np.arange(20)[None] >= np.array([[0], [3], [7], [19]]))
    positions = jnp.maximum(jnp.cumsum(mask, 1) - 1, 0)
    out = {}
    for kernel in ("plain", "blocked", "splash"):  # splash: Pallas' interpreter on CPU
        graphdef, params = T.init(dataclasses.replace(cfg, attention=kernel))

        def loss(p, graphdef=graphdef):
            logits, _ = T.forward(graphdef, p, tokens, positions, mask)
            return jnp.sum(jnp.where(mask[..., None], jax.nn.log_softmax(logits), 0.0)), logits

        out[kernel] = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    (l_p, logits_p), g_p = out["plain"]
    for kernel in ("blocked", "splash"):
        (l_b, logits_b), g_b = out[kernel]
        np.testing.assert_allclose(np.asarray(logits_b)[np.asarray(mask)], np.asarray(logits_p)[np.asarray(mask)],
                                   atol=1e-5)
        # another summation order moves a gradient entry by a few float32 ulps of the largest entry it
        # accumulates with (measured: up to 3.8e-7 x the leaf's max |g|, entries up to 110): allow 32 ulps
        for a, b in zip(jax.tree.leaves(g_b), jax.tree.leaves(g_p)):
            b = np.asarray(b)
            np.testing.assert_allclose(np.asarray(a), b, rtol=0, atol=4e-6 * np.abs(b).max())
    assert dataclasses.replace(cfg, attention="auto").attention == "auto"
    with pytest.raises(ValueError, match="attention must be one of"):
        dataclasses.replace(cfg, attention="flash")


@pytest.mark.parametrize("groups,n,S,H,KV,hd,W,T", [(3, 4, 1, 4, 2, 8, 5, 7), (2, 3, 3, 6, 3, 4, 4, 6),
                                                     (4, 1, 1, 2, 1, 8, 3, 2)])
def test_with_prefix_equals_plain_over_the_repeated_prefix(groups, n, S, H, KV, hd, W, T):
    """A prefix shared by each group of n rows equals plain attention over [prefix repeated n times ; own keys],
    in both key layouts (keys_t: the cache's [.., hd, T])."""
    rng = np.random.default_rng(0)
    B = groups * n
    q = jnp.asarray(rng.normal(size=(B, S, H, hd)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(B, KV, T, hd)), jnp.float32) for _ in range(2))
    pk, pv = (jnp.asarray(rng.normal(size=(groups, KV, W, hd)), jnp.float32) for _ in range(2))
    mask = jnp.asarray(rng.uniform(size=(B, S, T)) < 0.6)
    pmask = jnp.asarray(rng.uniform(size=(groups, W)) < 0.7).at[:, -1].set(True)
    keys = jnp.concatenate([jnp.repeat(pk, n, 0), k], 2)
    full_mask = jnp.concatenate([jnp.broadcast_to(jnp.repeat(pmask, n, 0)[:, None], (B, S, W)), mask], 2)
    ref = A.plain(q, keys, jnp.concatenate([jnp.repeat(pv, n, 0), v], 2), full_mask)
    np.testing.assert_allclose(A.with_prefix(q, k, v, mask, pk, pv, pmask), ref, atol=1e-6, rtol=1e-5)
    t = lambda x: jnp.swapaxes(x, 2, 3)  # noqa: E731
    np.testing.assert_allclose(A.with_prefix(q, t(k), v, mask, t(pk), pv, pmask, keys_t=True), ref, atol=1e-6,
                               rtol=1e-5)
    np.testing.assert_allclose(A.plain(q, t(keys), jnp.concatenate([jnp.repeat(pv, n, 0), v], 2), full_mask,
                                       keys_t=True), ref, atol=1e-6, rtol=1e-5)
    if B % (groups + 1):  # rows that do not split into groups of the prefix rows
        more = lambda x: jnp.concatenate([x, x[:1]])  # noqa: E731
        with pytest.raises(ValueError, match="do not split into groups"):
            A.with_prefix(q, k, v, mask, more(pk), more(pv), more(pmask))


def _batch_layout_inputs(B, S, H, KV, hd, seed=0):
    """Rows as the train batch lays them out: left padding, the prompt, the completion, right padding (one
    contiguous run of valid tokens per row; one row full, one with a single token)."""
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.normal(size=shape), jnp.float32) for shape in
               ((B, S, H, hd), (B, KV, S, hd), (B, KV, S, hd)))
    start = rng.integers(0, S // 2, B)
    end = np.minimum(S, start + 1 + rng.integers(0, S, B))
    start[0], end[0] = 0, S
    start[-1], end[-1] = S // 3, S // 3 + 1
    t = np.arange(S)
    valid = (t[None] >= start[:, None]) & (t[None] < end[:, None])
    mask = jnp.asarray((t[None, :] <= t[:, None])[None] & valid[:, None, :])
    seen = jnp.asarray(valid)[:, :, None, None]  # the queries whose outputs are used
    weights = jnp.asarray(rng.normal(size=(B, S, H, hd)), jnp.float32)
    return q, k, v, mask, jnp.asarray(valid), seen, weights


@pytest.mark.parametrize("shape", [(3, 16, 4, 2, 8), (5, 37, 2, 1, 16), (2, 64, 4, 4, 8)])
def test_library_flash_path_matches_plain(shape):
    """``attention.flash`` (the cuDNN path's row rotation and per-row lengths) through XLA's implementation of
    ``jax.nn.dot_product_attention``: values at valid queries and all input gradients equal the plain kernel's
    to float32 rounding; outputs at padding are zero. The cuDNN kernel itself runs in bench/gpu.sh."""
    q, k, v, mask, valid, seen, w = _batch_layout_inputs(*shape)
    flash = lambda q, k, v, m: A.flash(q, k, v, m, implementation=None)  # noqa: E731
    ref, out = A.plain(q, k, v, mask), jax.jit(flash)(q, k, v, valid)
    np.testing.assert_allclose(np.where(seen, out, 0), np.where(seen, ref, 0), atol=2e-6, rtol=1e-5)
    assert float(jnp.max(jnp.abs(jnp.where(seen, 0, out)))) == 0.0
    g_ref = jax.grad(_loss(A.plain, mask, seen, w), (0, 1, 2))(q, k, v)
    g_out = jax.jit(jax.grad(_loss(flash, valid, seen, w), (0, 1, 2)))(q, k, v)
    for a, b in zip(g_out, g_ref):
        assert float(jnp.max(jnp.abs(a - b))) <= 1e-5 * float(jnp.max(jnp.abs(b)))


def test_kernel_choice_per_backend_and_cudnn_limits():
    tiny = T.ModelConfig.tiny(vocab_size=64)
    bf16 = dataclasses.replace(tiny, dtype="bfloat16")
    assert T.no_cache_kernel(tiny, "cpu") == "blocked" and T.no_cache_kernel(bf16, "tpu") == "splash"
    assert T.no_cache_kernel(bf16, "gpu") == "cudnn"
    assert T.no_cache_kernel(tiny, "gpu") == "blocked"  # float32: outside cuDNN's limits
    assert T.no_cache_kernel(dataclasses.replace(tiny, attention="plain"), "gpu") == "plain"
    with pytest.raises(ValueError, match=r"model.attention='cudnn': cuDNN flash attention needs model.dtype"):
        dataclasses.replace(tiny, attention="cudnn")
    with pytest.raises(ValueError, match="head_dim that is a multiple of 8 and <= 128, got 256"):
        T.ModelConfig.tiny(vocab_size=64, dtype="bfloat16", head_dim=256, attention="cudnn")


@pytest.mark.parametrize("shape,mesh_shape", [((3, 40, 4, 2, 32), None), ((2, 130, 2, 1, 128), None),
                                              ((8, 24, 4, 2, 16), (2, 2, 2))])
def test_splash_matches_plain(shape, mesh_shape):
    """Pallas splash attention (in Pallas' interpreter off TPU; the TPU kernel is the same program): segment
    ids for padding, one multi-query kernel per kv head, the sequence padded to 128, and per-shard under a mesh
    (shard_map over batch and kv heads); values where a query sees a key and all input gradients equal plain."""
    q, k, v, mask, valid, seen, w = _batch_layout_inputs(*shape)
    run = jax.jit(A.splash)
    grad = jax.jit(jax.grad(_loss(A.splash, valid, seen, w), (0, 1, 2)))
    if mesh_shape is not None:
        mesh = parallel.make_mesh(*mesh_shape)
        with jax.set_mesh(mesh):
            out, g_out = run(q, k, v, valid), grad(q, k, v)
    else:
        out, g_out = run(q, k, v, valid), grad(q, k, v)
    ref = A.plain(q, k, v, mask)
    np.testing.assert_allclose(np.where(seen, out, 0), np.where(seen, ref, 0), atol=2e-6, rtol=1e-5)
    g_ref = jax.grad(_loss(A.plain, mask, seen, w), (0, 1, 2))(q, k, v)
    for a, b in zip(g_out, g_ref):
        assert float(jnp.max(jnp.abs(a - b))) <= 1e-5 * float(jnp.max(jnp.abs(b)))
