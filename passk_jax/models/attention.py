"""Attention kernels of the decoder, in plain XLA.

* ``plain(q, k, v, mask)``: one einsum-softmax-einsum over the whole [S, T] score matrix. Used with a KV cache
  (prefill and decode) and, by default, on accelerators, where XLA fuses it well.
* ``with_prefix(q, k, v, mask, prefix_k, prefix_v, prefix_mask)``: ``plain`` over a prompt prefix shared by
  groups of rows (group rollouts: n samples of one prompt) followed by each row's own keys. The prefix is held
  once per group and its scores are one batched matmul per group (n x more query rows per key read), instead
  of n copies of the prompt cache.
* ``blocked_causal(q, k, v, valid)``: the no-cache (training / scoring) path on CPU, and the O(S) stand-in
  for the accelerator kernels in ``experiments.plan``. FlashAttention-style: a ``custom_vjp`` whose forward
  and backward walk blocks of rows (``lax.map``). Up to ``LONG_FROM`` positions a block is cut into chunks of
  queries that read only the keys at or before the chunk (causal: later keys are masked anyway), each chunk's
  f32 scores small enough for the CPU caches; longer rows take square tiles of ``KEY_BLOCK`` queries x keys
  with an online softmax (running max and sum) over the key tiles at or before the query tile, so memory is
  O(S) at every length. The backward recomputes the probabilities from the saved log-sum-exp instead of
  storing them, and the masked upper triangle is never computed. The mask is built per tile from the keys'
  validity (bool[B, S]), never as [B, S, S]. Same results as ``plain`` to float32 rounding wherever a query
  has at least one visible key.

* ``flash(q, k, v, valid, implementation)``: the no-cache path through ``jax.nn.dot_product_attention`` (on a
  GPU ``implementation="cudnn"``: cuDNN's FlashAttention, O(S) memory, bf16 / fp16 only). The library kernel
  takes causal attention with per-row lengths, not an arbitrary mask, so each row's valid tokens must be one
  contiguous run (the train batch: a left-padded prompt followed by its right-padded completion); the rows
  are rotated to start at 0, attended with ``is_causal`` and ``key_value_seq_lengths``, and rotated back.

* ``splash(q, k, v, valid)``: the no-cache path through the Pallas splash attention kernel of
  ``jax.experimental.pallas.ops.tpu`` (TPU; O(S) memory, causal blocks above the diagonal skipped): padding
  becomes segment ids (valid tokens 1, padding 0), grouped-query heads run as one multi-query kernel per kv
  head, the sequence is padded to a multiple of 128, and under a mesh the kernel runs per shard
  (``shard_map`` over the batch and kv-head axes; Pallas kernels are not partitioned by XLA). Off TPU it runs
  in Pallas' interpreter (tests).

Layouts: q [B,S,H,hd], k/v [B,KV,T,hd], mask bool[B,S,T] (the no-cache kernels take the keys' validity
bool[B,S] instead: query s sees key t iff t <= s and valid[b, t]); query head h uses kv head h // (H / KV) (HF
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
# Rows longer than this take square key-blocked tiles of KEY_BLOCK positions (O(S) at every length).
LONG_FROM = 2048
KEY_BLOCK = 512


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


def _causal_mask(valid: jax.Array, q0, k0, nq: int, nk: int) -> jax.Array:
    """bool[b, nq, nk]: query q0 + i sees key k0 + j iff k0 + j <= q0 + i and valid[b, j] (valid: [b, nk], the
    keys' validity); q0 / k0 may be traced."""
    return ((k0 + jnp.arange(nk))[None, :] <= (q0 + jnp.arange(nq))[:, None])[None] & valid[:, None, :]


def _fwd_chunk(q, k, v, mask, scale):
    s = _scores(q, k, mask, scale)
    m = jnp.max(s, -1, keepdims=True)
    e = jnp.exp(s - m)
    total = jnp.sum(e, -1, keepdims=True)
    b, KV, S, G, T = s.shape
    o = jnp.einsum("bnqt,bntk->bnqk", (e / total).reshape(b, KV, S * G, T).astype(v.dtype), v)
    return o, (m + jnp.log(total))[..., 0].reshape(b, KV, S * G)


def _bwd_tile(q, k, v, mask, lse, do, delta, scale):
    """Gradients of one (query, key) tile from the saved log-sum-exp: (dq, dk, dv) in float32."""
    s = _scores(q, k, mask, scale)
    b, KV, S, G, T = s.shape
    p = jnp.exp(s.reshape(b, KV, S * G, T) - lse[..., None])
    dv = jnp.einsum("bnqt,bnqk->bntk", p.astype(do.dtype), do, preferred_element_type=jnp.float32)
    dp = jnp.einsum("bnqk,bntk->bnqt", do, v, preferred_element_type=jnp.float32)
    ds = (p * (dp - delta[..., None]) * scale).astype(q.dtype)
    dq = jnp.einsum("bnqt,bntk->bnqk", ds, k, preferred_element_type=jnp.float32)
    dk = jnp.einsum("bnqt,bnqk->bntk", ds, q, preferred_element_type=jnp.float32)
    return dq, dk, dv


def _delta(o, do):
    return jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), -1)


def _fwd_block(q, k, v, valid, scale, chunks):
    G = q.shape[2] // valid.shape[1]
    outs = [_fwd_chunk(q[:, :, lo * G:hi * G], k[:, :, :hi], v[:, :, :hi],
                       _causal_mask(valid[:, :hi], lo, 0, hi - lo, hi), scale) for lo, hi in chunks]
    return jnp.concatenate([o for o, _ in outs], 2), jnp.concatenate([lse for _, lse in outs], 2)


def _bwd_block(q, k, v, valid, o, lse, do, scale, chunks):
    G = q.shape[2] // valid.shape[1]
    dqs, dk, dv = [], jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)
    for lo, hi in chunks:
        rows = slice(lo * G, hi * G)
        dq_c, dk_c, dv_c = _bwd_tile(q[:, :, rows], k[:, :, :hi], v[:, :, :hi],
                                     _causal_mask(valid[:, :hi], lo, 0, hi - lo, hi), lse[:, :, rows],
                                     do[:, :, rows], _delta(o[:, :, rows], do[:, :, rows]), scale)
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
def _blocked(q, k, v, valid, rows, chunks, scale):
    return _blocked_fwd(q, k, v, valid, rows, chunks, scale)[0]


def _blocked_fwd(q, k, v, valid, rows, chunks, scale):
    fwd = _fwd_block if isinstance(chunks, tuple) else _long_fwd_block
    o, lse = jax.lax.map(lambda a: fwd(*a, scale, chunks), tuple(_to_blocks(x, rows) for x in (q, k, v, valid)))
    o = _from_blocks(o)
    return o, (q, k, v, valid, o, _from_blocks(lse))


def _blocked_bwd(rows, chunks, scale, res, do):
    bwd = _bwd_block if isinstance(chunks, tuple) else _long_bwd_block
    blocks = tuple(_to_blocks(x, rows) for x in (*res, do))
    dq, dk, dv = jax.lax.map(lambda a: bwd(*a, scale, chunks), blocks)
    return _from_blocks(dq), _from_blocks(dk), _from_blocks(dv), None


_blocked.defvjp(_blocked_fwd, _blocked_bwd)


# Long rows: key-blocked online softmax over square tiles of C queries x C keys (C = ``chunks``, an int).
# Query tile i visits key tiles 0..i (a while loop: the causal upper triangle is never computed), keeping a
# running max, sum and output; the backward walks key tiles j and, inside, query tiles j..n-1, accumulating
# dk / dv of the tile and adding into dq. Memory: O(S) residuals plus one tile of scores.
def _tiles(x: jax.Array, i, size: int, axis: int) -> jax.Array:
    return jax.lax.dynamic_slice_in_dim(x, i * size, size, axis)


def _long_fwd_block(q, k, v, valid, scale, C):
    b, KV, SG, hd = q.shape
    S = valid.shape[1]
    G, n = SG // S, S // C

    def query_tile(i):
        qi = _tiles(q, i, C * G, 2)

        def key_tile(j, carry):
            m, l, acc = carry
            s = _scores(qi, _tiles(k, j, C, 2), _causal_mask(_tiles(valid, j, C, 1), i * C, j * C, C, C), scale)
            s = s.reshape(b, KV, C * G, C)
            m_new = jnp.maximum(m, jnp.max(s, -1))
            p = jnp.exp(s - m_new[..., None])
            corr = jnp.exp(m - m_new)
            pv = jnp.einsum("bnqt,bntk->bnqk", p.astype(v.dtype), _tiles(v, j, C, 2),
                            preferred_element_type=jnp.float32)
            return m_new, l * corr + jnp.sum(p, -1), acc * corr[..., None] + pv

        init = (jnp.full((b, KV, C * G), _NEG, jnp.float32), jnp.zeros((b, KV, C * G), jnp.float32),
                jnp.zeros((b, KV, C * G, hd), jnp.float32))
        m, l, acc = jax.lax.fori_loop(0, i + 1, key_tile, init)
        return (acc / l[..., None]).astype(q.dtype), m + jnp.log(l)

    o, lse = jax.lax.map(query_tile, jnp.arange(n))            # [n, b, KV, C*G, (hd)]
    return (jnp.moveaxis(o, 0, 2).reshape(b, KV, SG, hd), jnp.moveaxis(lse, 0, 2).reshape(b, KV, SG))


def _long_bwd_block(q, k, v, valid, o, lse, do, scale, C):
    b, KV, SG, hd = q.shape
    S = valid.shape[1]
    G, n = SG // S, S // C
    delta = _delta(o, do)

    def key_tile(dq, j):
        kj, vj = _tiles(k, j, C, 2), _tiles(v, j, C, 2)
        valid_j = _tiles(valid, j, C, 1)

        def query_tile(i, carry):
            dk, dv, dq = carry
            rows = lambda x: _tiles(x, i, C * G, 2)  # noqa: E731
            dq_i, dk_i, dv_i = _bwd_tile(rows(q), kj, vj, _causal_mask(valid_j, i * C, j * C, C, C), rows(lse),
                                         rows(do), rows(delta), scale)
            dq = jax.lax.dynamic_update_slice_in_dim(dq, rows(dq) + dq_i, i * C * G, 2)
            return dk + dk_i, dv + dv_i, dq

        zeros = jnp.zeros((b, KV, C, hd), jnp.float32)
        dk, dv, dq = jax.lax.fori_loop(j, n, query_tile, (zeros, zeros, dq))
        return dq, (dk, dv)

    dq, (dk, dv) = jax.lax.scan(key_tile, jnp.zeros(q.shape, jnp.float32), jnp.arange(n))
    merge = lambda x, like: jnp.moveaxis(x, 0, 2).reshape(like.shape).astype(like.dtype)  # noqa: E731
    return dq.astype(q.dtype), merge(dk, k), merge(dv, v)


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


def _rows_per_block(batch: int, per_row: int, shards: int) -> int:
    """As many rows per block (a multiple of ``shards`` dividing ``batch``) as keep one tile's scores near
    ``_BLOCK_BYTES`` (at least one row per shard)."""
    local = batch // shards if shards > 1 and batch % shards == 0 else batch
    shards = batch // local
    want = max(1, _BLOCK_BYTES // (per_row * shards))
    return max(d for d in range(1, local + 1) if local % d == 0 and d <= want) * shards


def blocked_plan(batch: int, seq: int, heads: int, shards: int = 1,
                 key_block: int | None = None) -> tuple[int, tuple[tuple[int, int], ...] | int]:
    """(rows per block, tiling) for ``blocked_causal``. Up to ``LONG_FROM`` positions the tiling is query
    chunks of about 40 queries (at most 16) that read all keys up to the chunk's end; longer rows (or any
    ``key_block``) use square tiles of ``key_block`` (default ``KEY_BLOCK``) queries x keys, the tiling being
    that int."""
    if key_block is None and seq <= LONG_FROM:
        chunks = tuple(_chunks(seq, min(_MAX_CHUNKS, max(1, -(-seq // 40)))))
        return _rows_per_block(batch, heads * (chunks[0][1] - chunks[0][0]) * max(1, seq // 2) * 4, shards), chunks
    C = key_block or KEY_BLOCK
    return _rows_per_block(batch, heads * C * C * 4, shards), C


def blocked_causal(q: jax.Array, k: jax.Array, v: jax.Array, valid: jax.Array,
                   key_block: int | None = None) -> jax.Array:
    """No-cache causal attention, blocked (see the module docstring): q [B,S,H,hd], k/v [B,KV,S,hd], valid
    bool[B,S]; query s attends key t iff t <= s and valid[b, t] (``plain`` with that mask). Rows longer than
    ``LONG_FROM`` (or any row, given ``key_block``) take the key-blocked tiles, padded to a multiple of the
    tile."""
    B, S, H, hd = q.shape
    KV = k.shape[1]
    if k.shape[2] != S:
        raise ValueError(f"blocked_causal needs as many keys as queries, got {k.shape[2]} keys for {S} queries.")
    if valid.shape != (B, S):
        raise ValueError(f"blocked_causal takes the keys' validity as bool[{B}, {S}], got {valid.shape}.")
    rows, tiling = blocked_plan(B, S, H, _row_shards(B), key_block)
    Sp = S if isinstance(tiling, tuple) else -(-S // tiling) * tiling
    if Sp != S:
        pad = lambda x, axis: jnp.pad(x, [(0, 0)] * axis + [(0, Sp - S)] + [(0, 0)] * (x.ndim - axis - 1))  # noqa: E731
        q, k, v, valid = pad(q, 1), pad(k, 2), pad(v, 2), pad(valid, 1)
    o = _blocked(_merge_groups(q, KV), k, v, valid, rows, tiling, hd ** -0.5)
    return _split_groups(o, Sp)[:, :S]


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


def flash(q: jax.Array, k: jax.Array, v: jax.Array, valid: jax.Array, implementation: str | None = None) -> jax.Array:
    """``blocked_causal`` for rows whose valid tokens are one contiguous run, through
    ``jax.nn.dot_product_attention(..., implementation=implementation)`` ("cudnn" on a GPU; None: XLA's own,
    used to test the rotation on CPU). q [B,S,H,hd], k/v [B,KV,S,hd], valid bool[B,S] -> [B,S,H,hd]; outputs at
    padding queries are zero."""
    B, S, H, hd = q.shape
    if k.shape[2] != S:
        raise ValueError(f"flash attention needs as many keys as queries, got {k.shape[2]} keys for {S} queries.")
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


def splash(q: jax.Array, k: jax.Array, v: jax.Array, valid: jax.Array, interpret: bool | None = None) -> jax.Array:
    """``blocked_causal`` through Pallas' splash attention (see the module docstring). q [B,S,H,hd],
    k/v [B,KV,S,hd], valid bool[B,S] -> [B,S,H,hd] (values at valid queries); ``interpret`` defaults to "not on
    a TPU"."""
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
    segments = valid.astype(jnp.int32)
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
