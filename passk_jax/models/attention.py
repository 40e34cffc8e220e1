"""Attention kernels of the decoder, in plain XLA.

* ``plain(q, k, v, mask)``: one einsum-softmax-einsum over the whole [S, T] score matrix. Used with a KV cache
  (prefill and decode) and, by default, on accelerators, where XLA fuses it well.
* ``with_prefix(q, k, v, mask, prefix_k, prefix_v, prefix_mask)``: ``plain`` over a prompt prefix shared by
  groups of rows (group rollouts: n samples of one prompt) followed by each row's own keys. The prefix is held
  once per group and its scores are one batched matmul per group (n x more query rows per key read), instead
  of n copies of the prompt cache.
* ``blocked_causal(q, k, v, mask)``: the no-cache (training / scoring) path on CPU. FlashAttention-style: a
  ``custom_vjp`` whose forward and backward walk blocks of rows (``lax.map``) and, inside a block, chunks of
  queries that only read the keys at or before the chunk (causal: later keys are masked anyway). Each block's
  f32 scores stay small enough for the CPU caches, the backward recomputes the probabilities from the saved
  log-sum-exp instead of storing them, and the masked upper triangle is never computed. Same results as
  ``plain`` to float32 rounding wherever a query has at least one visible key.

* ``flash(q, k, v, mask, implementation)``: the no-cache path through ``jax.nn.dot_product_attention`` (on a
  GPU ``implementation="cudnn"``: cuDNN's FlashAttention, O(S) memory, bf16 / fp16 only). The library kernel
  takes causal attention with per-row lengths, not an arbitrary mask, so each row's valid tokens must be one
  contiguous run (the train batch: a left-padded prompt followed by its right-padded completion); the rows
  are rotated to start at 0, attended with ``is_causal`` and ``key_value_seq_lengths``, and rotated back.

* ``splash(q, k, v, mask)``: the no-cache path through the Pallas splash attention kernel of
  ``jax.experimental.pallas.ops.tpu`` (TPU; O(S) memory, causal blocks above the diagonal skipped): padding
  becomes segment ids (valid tokens 1, padding 0), grouped-query heads run as one multi-query kernel per kv
  head, the sequence is padded to a multiple of 128, and under a mesh the kernel runs per shard
  (``shard_map`` over the batch and kv-head axes; Pallas kernels are not partitioned by XLA). Off TPU it runs
  in Pallas' interpreter (tests).

Layouts: q [B,S,H,hd], k/v [B,KV,T,hd], mask bool[B,S,T]; query head h uses kv head h // (H / KV) (HF
``repeat_kv``). ``keys_t=True`` takes k as [B,KV,hd,T] instead (the KV cache's key layout: slots minor, so
the scores are a matmul whose right operand needs no transpose).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

# A finite "minus infinity": a query that sees no key gets a uniform distribution instead of NaN (its output
# is ignored: such positions are padding).
_NEG = float(jnp.finfo(jnp.float32).min)
# f32 bytes of one block's scores that stay in a 2-core CPU's caches well (bench/RESULTS.md: blocks of
# 0.5-4 MiB measured alike).
_BLOCK_BYTES = 2 << 20
_MAX_CHUNKS = 16


def _merge_groups(q: jax.Array, kv_heads: int) -> jax.Array:
    """q [B,S,H,hd] -> [B,KV,S*G,hd] (rows of the merged axis are (s, g))."""
    B, S, H, hd = q.shape
    return jnp.swapaxes(q.reshape(B, S, kv_heads, H // kv_heads, hd), 1, 2).reshape(B, kv_heads, S * (H // kv_heads), hd)


def _split_groups(o: jax.Array, S: int) -> jax.Array:
    """[B,KV,S*G,hd] -> [B,S,H,hd]."""
    B, KV, SG, hd = o.shape
    return jnp.swapaxes(o.reshape(B, KV, S, SG // S, hd), 1, 2).reshape(B, S, KV * (SG // S), hd)


def _scores(q: jax.Array, k: jax.Array, mask: jax.Array, scale: float, keys_t: bool = False) -> jax.Array:
    """q [b,KV,S*G,hd], k [b,KV,T,hd] (keys_t: [b,KV,hd,T]), mask [b,S,T] -> masked f32 scores [b,KV,S,G,T]."""
    b, KV, SG, _ = q.shape
    S = mask.shape[1]
    spec = "bnqk,bnkt->bnqt" if keys_t else "bnqk,bntk->bnqt"
    s = jnp.einsum(spec, q, k, preferred_element_type=jnp.float32) * scale
    s = s.reshape(b, KV, S, SG // S, -1)
    return jnp.where(mask[:, None, :, None], s, _NEG)


def plain(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, keys_t: bool = False) -> jax.Array:
    """q [B,S,H,hd], k/v [B,KV,T,hd] (keys_t: k [B,KV,hd,T]), mask bool[B,S,T] -> [B,S,H,hd]; softmax in
    float32. Batch-leading einsums over [B, KV, S*G, .] so k/v (the cache layout) are read without a
    transpose."""
    B, S, H, hd = q.shape
    KV = k.shape[1]
    s = _scores(_merge_groups(q, KV), k, mask, hd ** -0.5, keys_t)
    probs = jax.nn.softmax(s, axis=-1).astype(v.dtype).reshape(B, KV, S * (H // KV), -1)
    return _split_groups(jnp.einsum("bnqt,bntk->bnqk", probs, v), S)


def _group_rows(x: jax.Array, groups: int) -> jax.Array:
    """[B, S, KV, G, X] -> [P, KV, n*S*G, X] with B = P * n (prompt-major rows: row = p * n + j)."""
    B, S, KV, G, X = x.shape
    x = jnp.moveaxis(x.reshape(groups, B // groups, S, KV, G, X), 3, 1)
    return x.reshape(groups, KV, (B // groups) * S * G, X)


def _ungroup_rows(x: jax.Array, S: int, G: int) -> jax.Array:
    """Inverse of ``_group_rows``: [P, KV, n*S*G, X] -> [B, S, KV, G, X]."""
    P, KV, nSG, X = x.shape
    n = nSG // (S * G)
    return jnp.moveaxis(x.reshape(P, KV, n, S, G, X), 1, 3).reshape(P * n, S, KV, G, X)


def with_prefix(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, prefix_k: jax.Array,
                prefix_v: jax.Array, prefix_mask: jax.Array, keys_t: bool = False) -> jax.Array:
    """Attention over [shared prefix ; own keys]: q [B,S,H,hd]; own k/v [B,KV,T,hd] with mask bool[B,S,T];
    prefix_k/v [P,KV,W,hd] with prefix_mask bool[P,W], visible to every query of rows p*n .. p*n + n - 1
    (B = P * n); keys_t: both k and prefix_k are [.., hd, T] / [.., hd, W]. Equals
    ``plain(q, concat([repeat(prefix_k, n), k]), ...)`` with the prefix mask broadcast over queries; one
    softmax in float32 over both parts."""
    B, S, H, hd = q.shape
    P, KV = prefix_k.shape[:2]
    W = prefix_v.shape[2]
    G = H // KV
    if B % P:
        raise ValueError(f"{B} query rows do not split into groups of the {P} prefix rows.")
    scale = hd ** -0.5
    own = _scores(_merge_groups(q, KV), k, mask, scale, keys_t)                              # [B,KV,S,G,T]
    qg = _group_rows(q.reshape(B, S, KV, G, hd), P)                                          # [P,KV,n*S*G,hd]
    spec = "pnqk,pnkt->pnqt" if keys_t else "pnqk,pntk->pnqt"
    shared = jnp.einsum(spec, qg, prefix_k, preferred_element_type=jnp.float32) * scale
    shared = jnp.where(prefix_mask[:, None, None, :], shared, _NEG)
    shared = jnp.moveaxis(_ungroup_rows(shared, S, G), 2, 1)                                 # [B,KV,S,G,W]
    probs = jax.nn.softmax(jnp.concatenate([shared, own], -1), axis=-1).astype(v.dtype)
    p_shared = _group_rows(jnp.moveaxis(probs[..., :W], 1, 2), P)                             # [P,KV,n*S*G,W]
    o_shared = _ungroup_rows(jnp.einsum("pnqt,pntk->pnqk", p_shared, prefix_v), S, G)       # [B,S,KV,G,hd]
    o_own = jnp.einsum("bnqt,bntk->bnqk", probs[..., W:].reshape(B, KV, S * G, -1), v)
    return o_shared.reshape(B, S, H, hd) + _split_groups(o_own, S)


# ------------------------------------------------------------------------------------------ blocked causal
def _chunks(S: int, C: int) -> list[tuple[int, int]]:
    c = -(-S // C)
    return [(i * c, min((i + 1) * c, S)) for i in range(C) if i * c < S]


def _fwd_chunk(q, k, v, mask, scale):
    s = _scores(q, k, mask, scale)
    m = jnp.max(s, -1, keepdims=True)
    e = jnp.exp(s - m)
    total = jnp.sum(e, -1, keepdims=True)
    b, KV, S, G, T = s.shape
    o = jnp.einsum("bnqt,bntk->bnqk", (e / total).reshape(b, KV, S * G, T).astype(v.dtype), v)
    return o, (m + jnp.log(total))[..., 0].reshape(b, KV, S * G)


def _bwd_chunk(q, k, v, mask, o, lse, do, scale):
    s = _scores(q, k, mask, scale)
    b, KV, S, G, T = s.shape
    p = jnp.exp(s.reshape(b, KV, S * G, T) - lse[..., None])
    dv = jnp.einsum("bnqt,bnqk->bntk", p.astype(do.dtype), do, preferred_element_type=jnp.float32)
    dp = jnp.einsum("bnqk,bntk->bnqt", do, v, preferred_element_type=jnp.float32)
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), -1, keepdims=True)
    ds = (p * (dp - delta) * scale).astype(q.dtype)
    dq = jnp.einsum("bnqt,bntk->bnqk", ds, k, preferred_element_type=jnp.float32)
    dk = jnp.einsum("bnqt,bnqk->bntk", ds, q, preferred_element_type=jnp.float32)
    return dq, dk, dv


def _fwd_block(q, k, v, mask, scale, chunks):
    G = q.shape[2] // mask.shape[1]
    outs = [_fwd_chunk(q[:, :, lo * G:hi * G], k[:, :, :hi], v[:, :, :hi], mask[:, lo:hi, :hi], scale)
            for lo, hi in chunks]
    return jnp.concatenate([o for o, _ in outs], 2), jnp.concatenate([lse for _, lse in outs], 2)


def _bwd_block(q, k, v, mask, o, lse, do, scale, chunks):
    G = q.shape[2] // mask.shape[1]
    dqs, dk, dv = [], jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)
    for lo, hi in chunks:
        rows = slice(lo * G, hi * G)
        dq_c, dk_c, dv_c = _bwd_chunk(q[:, :, rows], k[:, :, :hi], v[:, :, :hi], mask[:, lo:hi, :hi],
                                      o[:, :, rows], lse[:, :, rows], do[:, :, rows], scale)
        dqs.append(dq_c)
        dk, dv = dk.at[:, :, :hi].add(dk_c), dv.at[:, :, :hi].add(dv_c)
    return jnp.concatenate(dqs, 2).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


def _to_blocks(x: jax.Array, rows: int) -> jax.Array:
    """[B, ...] -> [B/rows, rows, ...]; block i holds rows {j * B/rows + i}, so the row axis keeps its
    (contiguous) data-parallel sharding and the mapped axis is unsharded."""
    B = x.shape[0]
    return jnp.swapaxes(x.reshape((rows, B // rows) + x.shape[1:]), 0, 1)


def _from_blocks(x: jax.Array) -> jax.Array:
    return jnp.swapaxes(x, 0, 1).reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _blocked(q, k, v, mask, rows, chunks, scale):
    return _blocked_fwd(q, k, v, mask, rows, chunks, scale)[0]


def _blocked_fwd(q, k, v, mask, rows, chunks, scale):
    o, lse = jax.lax.map(lambda a: _fwd_block(*a, scale, chunks), tuple(_to_blocks(x, rows) for x in (q, k, v, mask)))
    o = _from_blocks(o)
    return o, (q, k, v, mask, o, _from_blocks(lse))


def _blocked_bwd(rows, chunks, scale, res, do):
    blocks = tuple(_to_blocks(x, rows) for x in (*res, do))
    dq, dk, dv = jax.lax.map(lambda a: _bwd_block(*a, scale, chunks), blocks)
    return _from_blocks(dq), _from_blocks(dk), _from_blocks(dv), None


_blocked.defvjp(_blocked_fwd, _blocked_bwd)


def _row_shards(batch: int) -> int:
    """How many ways the row axis is split over the mesh set while tracing (1 without a mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return 1
    from passk_jax.parallel import logical_spec

    axes = logical_spec(("batch",), mesh, (batch,))
    names = axes[0] if len(axes) else None
    names = () if names is None else (names,) if isinstance(names, str) else tuple(names)
    return math.prod(mesh.shape[n] for n in names)


def blocked_plan(batch: int, seq: int, heads: int, shards: int = 1) -> tuple[int, tuple[tuple[int, int], ...]]:
    """(rows per block, query chunks) for ``blocked_causal``: chunks of about 40 queries (at most 16 chunks),
    and as many rows per block (a multiple of ``shards`` dividing ``batch``) as keep one chunk's scores near
    ``_BLOCK_BYTES``."""
    chunks = tuple(_chunks(seq, min(_MAX_CHUNKS, max(1, -(-seq // 40)))))
    per_row = heads * (chunks[0][1] - chunks[0][0]) * max(1, seq // 2) * 4
    local = batch // shards if shards > 1 and batch % shards == 0 else batch
    shards = batch // local
    want = max(1, _BLOCK_BYTES // (per_row * shards))
    rows_local = max(d for d in range(1, local + 1) if local % d == 0 and d <= want)
    return rows_local * shards, chunks


def blocked_causal(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """``plain`` for the no-cache causal case (T == S and mask[b, s, t] is False for t > s), blocked; see the
    module docstring."""
    B, S, H, hd = q.shape
    KV = k.shape[1]
    if k.shape[2] != S:
        raise ValueError(f"blocked_causal needs as many keys as queries, got {k.shape[2]} keys for {S} queries.")
    rows, chunks = blocked_plan(B, S, H, _row_shards(B))
    o = _blocked(_merge_groups(q, KV), k, v, mask, rows, chunks, hd ** -0.5)
    return _split_groups(o, S)


# ------------------------------------------------------------------------------------------ library flash
CUDNN_DTYPES = ("bfloat16", "float16")
CUDNN_MAX_HEAD_DIM = 128


def cudnn_limits(dtype: str, head_dim: int) -> str | None:
    """Why cuDNN's flash attention cannot run this model (None when it can): bf16 / fp16 compute and a head
    dimension that is a multiple of 8 and at most 128."""
    if dtype not in CUDNN_DTYPES:
        return f"cuDNN flash attention needs model.dtype in {CUDNN_DTYPES}, got {dtype!r}"
    if head_dim % 8 or head_dim > CUDNN_MAX_HEAD_DIM:
        return f"cuDNN flash attention needs a head_dim that is a multiple of 8 and <= {CUDNN_MAX_HEAD_DIM}, got {head_dim}"
    return None


def flash(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, implementation: str | None = None) -> jax.Array:
    """``plain`` for the no-cache causal case with contiguous valid tokens per row, through
    ``jax.nn.dot_product_attention(..., implementation=implementation)`` ("cudnn" on a GPU; None: XLA's own,
    used to test the rotation on CPU). q [B,S,H,hd], k/v [B,KV,S,hd], mask bool[B,S,S] -> [B,S,H,hd]; outputs at
    padding queries are zero."""
    B, S, H, hd = q.shape
    if k.shape[2] != S:
        raise ValueError(f"flash attention needs as many keys as queries, got {k.shape[2]} keys for {S} queries.")
    valid = mask[:, -1, :]                      # causal: the last query sees every valid key of its row
    start = jnp.argmax(valid, axis=1).astype(jnp.int32)
    length = jnp.sum(valid, axis=1, dtype=jnp.int32)
    pos = jnp.arange(S, dtype=jnp.int32)[None]
    fwd = ((pos + start[:, None]) % S)[:, :, None, None]   # rotated row r holds original position (r + start)
    back = ((pos - start[:, None]) % S)[:, :, None, None]
    rot = lambda x: jnp.take_along_axis(x, fwd, axis=1)  # noqa: E731
    out = jax.nn.dot_product_attention(rot(q), rot(jnp.swapaxes(k, 1, 2)), rot(jnp.swapaxes(v, 1, 2)),
                                       is_causal=True, query_seq_lengths=length, key_value_seq_lengths=length,
                                       implementation=implementation)
    out = jnp.where((pos < length[:, None])[:, :, None, None], out, 0).astype(q.dtype)
    return jnp.take_along_axis(out, back, axis=1)


# ------------------------------------------------------------------------------------------ Pallas splash
SPLASH_BLOCK = 128


def splash(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, interpret: bool | None = None) -> jax.Array:
    """``plain`` for the no-cache causal case through Pallas' splash attention (see the module docstring).
    q [B,S,H,hd], k/v [B,KV,S,hd], mask bool[B,S,S] -> [B,S,H,hd]; ``interpret`` defaults to "not on a TPU"."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    B, S, H, hd = q.shape
    KV = k.shape[1]
    G = H // KV
    if k.shape[2] != S:
        raise ValueError(f"splash attention needs as many keys as queries, got {k.shape[2]} keys for {S} queries.")
    if interpret is None:
        interpret = jax.default_backend() != "tpu"
    Sp = -(-S // SPLASH_BLOCK) * SPLASH_BLOCK
    segments = mask[:, -1, :].astype(jnp.int32)  # causal: the last query sees every valid key of its row
    qg = jnp.moveaxis((q * hd ** -0.5).reshape(B, S, KV, G, hd), 1, 3)       # [B,KV,G,S,hd]
    pad = lambda x, axis: jnp.pad(x, [(0, 0)] * axis + [(0, Sp - S)] + [(0, 0)] * (x.ndim - axis - 1))  # noqa: E731
    qg, k, v, segments = pad(qg, 3), pad(k, 2), pad(v, 2), pad(segments, 1)
    blocks = sk.BlockSizes(block_q=SPLASH_BLOCK, block_kv=SPLASH_BLOCK, block_kv_compute=SPLASH_BLOCK,
                           block_q_dkv=SPLASH_BLOCK, block_kv_dkv=SPLASH_BLOCK, block_kv_dkv_compute=SPLASH_BLOCK,
                           block_q_dq=SPLASH_BLOCK, block_kv_dq=SPLASH_BLOCK)
    kernel = sk.make_splash_mqa(sm.MultiHeadMask([sm.CausalMask((Sp, Sp))] * G), block_sizes=blocks,
                                head_shards=1, q_seq_shards=1, interpret=interpret)

    def local(qg, k, v, segments):  # [b,kv,G,Sp,hd], [b,kv,Sp,hd], [b,kv,Sp,hd], [b,Sp]
        one = lambda qq, kk, vv, ss: kernel(qq, kk, vv, segment_ids=sk.SegmentIds(q=ss, kv=ss))  # noqa: E731
        return jax.vmap(jax.vmap(one, in_axes=(0, 0, 0, None)))(qg, k, v, segments)

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        out = local(qg, k, v, segments)
    else:
        from jax.sharding import PartitionSpec

        from passk_jax.parallel import logical_spec

        def spec(axes, shape):
            return PartitionSpec(*(tuple(logical_spec(axes, mesh, shape)) + (None,) * len(shape))[:len(shape)])

        q_spec = spec(("batch", "kv_heads", None, None, None), qg.shape)
        kv_spec = spec(("batch", "kv_heads", None, None), k.shape)
        seg_spec = PartitionSpec(q_spec[0], None)
        out = jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, seg_spec), out_specs=q_spec,
                            check_vma=False)(qg, k, v, segments)
    return jnp.moveaxis(out[:, :, :, :S], 3, 1).reshape(B, S, H, hd).astype(q.dtype)
