"""Flax NNX decoder-only transformer for the Qwen2/Qwen2.5, Qwen3 and Llama 3.x families.

Pre-norm blocks (RMSNorm -> grouped-query attention with RoPE -> residual, RMSNorm -> SwiGLU -> residual).
Qwen2 adds q/k/v biases, Qwen3 a per-head RMSNorm on q and k, Llama 3.x the "llama3" RoPE frequency scaling
(each family's constants and named checkpoint shapes: `families.py`).
Every block parameter is stacked on a leading "layers" axis and the blocks run under one `lax.scan`, so the
compiled program (and compile time) does not grow with depth; `scan_layers=False` unrolls the stack instead
(faster on CPU: no stacked residual buffers to fill and slice). Hot paths use the pure `forward` on
`(graphdef, params)` from `split`; parameters carry logical axis names (`out_sharding` metadata) that
`passk_jax.parallel` maps onto the mesh.
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from passk_jax.models import attention, families
from passk_jax.parallel import constrain, logical_sharding, param_shardings

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
FAMILIES = tuple(families.FAMILIES)
ATTENTION_KERNELS = ("auto", "plain", "blocked", "cudnn", "splash")
ROPE_TYPES = ("default", "linear", "llama3")
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture + numerics. `head_dim` defaults to hidden_size // num_heads; `rope_scaling` is None or
    an HF-style dict such as {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: bool = False
    max_position_embeddings: int = 4096
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"
    scan_layers: bool = True
    attention: str = "auto"  # no-cache attention: "auto", "plain", "blocked", "cudnn", "splash" (no_cache_kernel)
    family: str = "qwen2"

    def __post_init__(self):
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}.")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}.")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}.")
        for field in ("dtype", "param_dtype"):
            if getattr(self, field) not in DTYPES:
                raise ValueError(f"{field} must be one of {tuple(DTYPES)}, got {getattr(self, field)!r}.")
        if self.attention not in ATTENTION_KERNELS:
            raise ValueError(f"attention must be one of {ATTENTION_KERNELS}, got {self.attention!r}.")
        if self.attention == "cudnn" and attention.cudnn_limits(self.dtype, self.head_dim):
            raise ValueError(f"model.attention='cudnn': {attention.cudnn_limits(self.dtype, self.head_dim)}; use "
                             "'auto' or 'blocked'.")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {tuple(REMAT_POLICIES)}, got {self.remat!r}.")
        rope = self.rope_scaling or {}
        rope_type = rope.get("rope_type", "default")
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"rope scaling type {rope_type!r} is not supported; supported: {ROPE_TYPES}.")
        needed = {"default": (), "linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor")}
        if any(key not in rope for key in needed[rope_type]) or rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError(f"rope_scaling {rope} needs keys {needed[rope_type]} and no partial rotary factor.")

    def __hash__(self) -> int:  # rope_scaling is a dict; the config is a static part of the graphdef
        fields = dataclasses.asdict(self)
        return hash(json.dumps(fields, sort_keys=True, default=str))

    @classmethod
    def tiny(cls, vocab_size: int = 256, **overrides: Any) -> ModelConfig:
        """Qwen2-shaped, about 1M parameters (vocab 256)."""
        base = dict(vocab_size=vocab_size, hidden_size=128, intermediate_size=512, num_layers=4, num_heads=4,
                    num_kv_heads=2, head_dim=32, rope_theta=1e6, tie_word_embeddings=True,
                    attention_bias=True, max_position_embeddings=4096, family="qwen2")
        return cls(**{**base, **overrides})

    @classmethod
    def small(cls, vocab_size: int = 256, **overrides: Any) -> ModelConfig:
        """Qwen2-shaped, about 25M parameters (vocab 256)."""
        base = dict(vocab_size=vocab_size, hidden_size=512, intermediate_size=1536, num_layers=8, num_heads=8,
                    num_kv_heads=2, head_dim=64, rope_theta=1e6, tie_word_embeddings=True,
                    attention_bias=True, max_position_embeddings=4096, family="qwen2")
        return cls(**{**base, **overrides})

    @classmethod
    def named(cls, name: str, **overrides: Any) -> ModelConfig:
        """The architecture of a named checkpoint in `families.CHECKPOINTS` (e.g. "qwen2.5-7b"), no weights."""
        if name not in families.CHECKPOINTS:
            raise ValueError(f"unknown model {name!r}; known: {', '.join(sorted(families.CHECKPOINTS))}.")
        return cls(**{**families.CHECKPOINTS[name], **overrides})

    def num_params(self) -> int:
        return sum(math.prod(shape) for shape, _, _ in param_specs(self).values())


class KVCache(NamedTuple):
    """k: [layers, batch, kv_heads, head_dim, max_len] (RoPE already applied; slots minor, so the decode
    scores q.k are a plain matmul whose right operand needs no packing transpose -- on CPU much faster
    than slots-major keys), v: [layers, batch, kv_heads, max_len, head_dim] (heads before slots, so attention
    reads each layer's cache without a transposed copy) -- or, for an unrolled layer stack
    (`scan_layers=False`), a tuple of one such array per layer (no layers axis), which each layer updates in
    place and attends over without slicing a copy out of a stacked buffer;
    valid: bool[batch, max_len]; index: int32 scalar, the next slot to write (shared by all rows: prompts
    are left-padded)."""
    k: jax.Array
    v: jax.Array
    valid: jax.Array
    index: jax.Array


CACHE_LOGICAL_AXES = KVCache(k=("layers", "batch", "kv_heads", "head_dim", "length"),
                             v=("layers", "batch", "kv_heads", "length", "head_dim"),
                             valid=("batch", "length"), index=())


class Prefix(NamedTuple):
    """The keys and values of P prompts for the no-cache (training) forward, made by ``forward(...,
    kv_out=True)`` and differentiable: k, v [layers, P, kv_heads, W, head_dim] (RoPE applied), valid bool[P, W].
    ``forward(..., prefix=Prefix, prefix_rows=...)`` then runs only the continuations of those prompts."""
    k: jax.Array
    v: jax.Array
    valid: jax.Array


def gather_prefix_rows(x: jax.Array, rows: jax.Array) -> jax.Array:
    """``x[rows]`` for ``rows`` i32[B]; for ``rows`` i32[G, B/G] (G groups, e.g. the data-parallel shards), row
    (g, i) reads ``x.reshape(G, P/G, ...)[g, rows[g, i]]``: a batched gather that stays on the group's shard."""
    x = jnp.asarray(x)
    if rows.ndim == 1:
        return x[rows]
    G, per = rows.shape
    y = x.reshape((G, x.shape[0] // G) + x.shape[1:])
    idx = rows.reshape((G, per) + (1,) * (x.ndim - 1))
    return jnp.take_along_axis(y, idx, axis=1).reshape((G * per,) + x.shape[1:])


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: str | None = None) -> KVCache:
    """Empty cache (valid all False, index 0); `dtype` defaults to the compute dtype (e.g. "bfloat16").
    Stacked k/v for `scan_layers`, else one array per layer (see `KVCache`)."""
    dt = DTYPES[dtype or cfg.dtype]
    shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
    k_shape = (batch, cfg.num_kv_heads, cfg.head_dim, max_len)
    if cfg.scan_layers:
        k, v = jnp.zeros((cfg.num_layers, *k_shape), dt), jnp.zeros((cfg.num_layers, *shape), dt)
    else:
        k = tuple(jnp.zeros(k_shape, dt) for _ in range(cfg.num_layers))
        v = tuple(jnp.zeros(shape, dt) for _ in range(cfg.num_layers))
    return KVCache(k=k, v=v, valid=jnp.zeros((batch, max_len), bool), index=jnp.zeros((), jnp.int32))


def map_cache(fn: Callable[[jax.Array, tuple], Any], cache: KVCache) -> KVCache:
    """Apply fn(array, logical axes) to every array of the cache (stacked or per-layer k/v)."""
    def field(x, axes):
        return tuple(fn(a, axes[1:]) for a in x) if isinstance(x, (tuple, list)) else fn(x, axes)
    return KVCache(*(field(x, axes) for x, axes in zip(cache, CACHE_LOGICAL_AXES)))


def cache_shardings(mesh: jax.sharding.Mesh, cache: KVCache) -> KVCache:
    """NamedSharding for each cache array (batch over data/fsdp, kv heads over tensor)."""
    return map_cache(lambda x, axes: logical_sharding(mesh, axes, x.shape), cache)


LAYER_PARAMS = ("input_norm", "q_proj", "k_proj", "v_proj", "o_proj", "q_bias", "k_bias", "v_bias", "q_norm",
                "k_norm", "post_attn_norm", "gate_proj", "up_proj", "down_proj")


def param_specs(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], tuple[str, ...], str]]:
    """Every parameter: name ("embed_tokens", "layers.q_proj", ...) -> (shape, logical axes, initializer)."""
    L, D, F, H, KV, hd, V = (cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_heads,
                             cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size)
    layer = {
        "input_norm": ((D,), ("norm",), "ones"),
        "q_proj": ((D, H, hd), ("embed", "heads", "head_dim"), "normal"),
        "k_proj": ((D, KV, hd), ("embed", "kv_heads", "head_dim"), "normal"),
        "v_proj": ((D, KV, hd), ("embed", "kv_heads", "head_dim"), "normal"),
        "o_proj": ((H, hd, D), ("heads", "head_dim", "embed"), "normal"),
        "post_attn_norm": ((D,), ("norm",), "ones"),
        "gate_proj": ((D, F), ("embed", "mlp"), "normal"),
        "up_proj": ((D, F), ("embed", "mlp"), "normal"),
        "down_proj": ((F, D), ("mlp", "embed"), "normal"),
    }
    if cfg.attention_bias:
        layer.update(q_bias=((H, hd), ("heads", "head_dim"), "zeros"),
                     k_bias=((KV, hd), ("kv_heads", "head_dim"), "zeros"),
                     v_bias=((KV, hd), ("kv_heads", "head_dim"), "zeros"))
    if cfg.qk_norm:
        layer.update(q_norm=((hd,), ("norm",), "ones"), k_norm=((hd,), ("norm",), "ones"))
    specs = {"embed_tokens": ((V, D), ("vocab", "embed"), "normal")}
    specs.update({f"layers.{k}": ((L, *shape), ("layers", *axes), init) for k, (shape, axes, init) in layer.items()})
    specs["norm"] = ((D,), ("norm",), "ones")
    if not cfg.tie_word_embeddings:
        specs["lm_head"] = ((D, V), ("embed", "vocab"), "normal")
    return specs


def _init_params(cfg: ModelConfig, key: jax.Array) -> dict[str, nnx.Param]:
    """normal(0, 0.02) weights, unit norms, zero biases. The normal weights are slices of ONE draw: a single
    RNG program compiles in a fraction of the time of one per tensor (the dominant cost of a CPU init)."""
    specs = param_specs(cfg)
    total = sum(math.prod(shape) for shape, _, init in specs.values() if init == "normal")
    flat = 0.02 * jax.random.normal(key, (total,), jnp.float32)
    params, offset = {}, 0
    for name, (shape, axes, init) in specs.items():
        if init == "normal":
            size = math.prod(shape)
            value = flat[offset:offset + size].reshape(shape)
            offset += size
        else:
            value = (jnp.ones if init == "ones" else jnp.zeros)(shape, jnp.float32)
        params[name] = nnx.Param(value.astype(DTYPES[cfg.param_dtype]), out_sharding=axes, eager_sharding=False)
    return params


class Layers(nnx.Module):
    """All decoder blocks; each parameter has a leading "layers" axis (names mirror the HF checkpoint).
    Absent parameters (biases outside Qwen2, q/k norms outside Qwen3) are None."""

    def __init__(self, params: dict[str, nnx.Param]):
        for name in LAYER_PARAMS:
            setattr(self, name, params.get(name))

    def stacked(self) -> dict[str, Any]:
        """name -> [layers, ...] array, or a tuple of per-layer arrays after ``unstack_layers``."""
        return {k: v.get_value() for k, v in vars(self).items() if isinstance(v, nnx.Param)}


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """f32[head_dim/2] inverse frequencies with the config's theta and scaling (as HF computes them)."""
    dim = cfg.head_dim
    inv = (1.0 / (np.float32(cfg.rope_theta) ** (np.arange(0, dim, 2).astype(np.float32) / np.float32(dim))))
    inv = inv.astype(np.float32)
    rs = cfg.rope_scaling or {}
    rope_type = rs.get("rope_type", "default")
    if rope_type == "linear":
        inv = inv / np.float32(rs["factor"])
    elif rope_type == "llama3":
        factor, low, high = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        old_len = rs.get("original_max_position_embeddings", cfg.max_position_embeddings)
        wavelen = (2 * math.pi / inv).astype(np.float32)
        scaled = np.where(wavelen > old_len / low, inv / factor, inv).astype(np.float32)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
        inv = np.where(medium, smoothed, scaled).astype(np.float32)
    return inv


def _rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE; x [B,S,N,hd], cos/sin f32[B,S,hd/2]."""
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(x.dtype)


def _rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return w.astype(x.dtype) * y.astype(x.dtype)


def no_cache_kernel(cfg: ModelConfig, backend: str | None = None) -> str:
    """The attention kernel of no-cache passes (training, scoring): ``cfg.attention``, or for "auto" an
    O(S)-memory kernel per backend: Pallas' splash attention on a TPU, cuDNN's flash attention on a GPU where
    its limits allow (``attention.cudnn_limits``: bf16 / fp16, head_dim <= 128), else the project's blocked
    kernel (CPU, float32 GPU runs). "plain" materialises the f32 [S, S] scores (fastest for short sequences)."""
    if cfg.attention != "auto":
        return cfg.attention
    backend = backend or jax.default_backend()
    if backend == "tpu":
        return "splash"
    if backend == "gpu" and attention.cudnn_limits(cfg.dtype, cfg.head_dim) is None:
        return "cudnn"
    return "blocked"


def _dense(x: jax.Array, w: jax.Array, contract: int = 1) -> jax.Array:
    """x [..., *w.shape[:contract]] @ w -> [..., *w.shape[contract:]] as ONE 2-D matmul: XLA's CPU backward of
    the equivalent batched einsum materialises transposed copies of the activation gradients."""
    lead = x.shape[:x.ndim - contract]
    k = math.prod(w.shape[:contract])
    y = jnp.dot(x.reshape(-1, k), w.reshape(k, -1))
    return y.reshape(*lead, *w.shape[contract:])


def _proj(x: jax.Array, p: dict[str, jax.Array], name: str, lora_scale: float, contract: int = 1) -> jax.Array:
    """One projection, plus its LoRA term ``scale * (x A) B`` when ``p`` holds ``name.lora_a`` / ``.lora_b``."""
    y = _dense(x, p[name], contract)
    if name + ".lora_a" in p:
        y = y + lora_scale * _dense(_dense(x, p[name + ".lora_a"], contract), p[name + ".lora_b"])
    return y


def _block(cfg: ModelConfig, x: jax.Array, p: dict[str, jax.Array], cos: jax.Array, sin: jax.Array,
           mask: jax.Array, kv: tuple[jax.Array, jax.Array, jax.Array, jax.Array] | None,
           prefix: tuple[jax.Array, jax.Array, jax.Array] | None = None, lora_scale: float = 0.0):
    """One decoder block on one layer's params. kv = (k_all, v_all, layer, index) writes this layer's
    keys/values into the stacked cache and attends over all its slots (returned: the updated cache; without a
    cache: this layer's own keys/values); prefix = (k, v, valid) of this layer's shared prompt prefix
    (``attention.with_prefix``, in the cache's layout or, without a cache, in [P,KV,W,hd]), attended before the
    row's own keys. mask: bool[B, S, T] for the
    plain kernel and the cache paths, the keys' validity bool[B, S] for the O(S) no-cache kernels. LoRA
    adapters, when present, are entries ``<proj>.lora_a`` / ``.lora_b`` of ``p`` (``_proj``)."""
    dt = x.dtype
    p = {name: w.astype(dt) for name, w in p.items()}
    h = _rms_norm(x, p["input_norm"], cfg.rms_norm_eps)
    q = _proj(h, p, "q_proj", lora_scale)
    k = _proj(h, p, "k_proj", lora_scale)
    v = _proj(h, p, "v_proj", lora_scale)
    if cfg.attention_bias:
        q, k, v = q + p["q_bias"], k + p["k_bias"], v + p["v_bias"]
    if cfg.qk_norm:
        q, k = _rms_norm(q, p["q_norm"], cfg.rms_norm_eps), _rms_norm(k, p["k_norm"], cfg.rms_norm_eps)
    q, k = _rope(q, cos, sin), _rope(k, cos, sin)
    q = constrain(q, ("batch", "length", "heads", "head_dim"))
    k = constrain(jnp.swapaxes(k, 1, 2), ("batch", "kv_heads", "length", "head_dim"))  # [B,KV,S,hd]
    v = constrain(jnp.swapaxes(v, 1, 2), ("batch", "kv_heads", "length", "head_dim"))  # cache layout
    if kv is not None:  # keys go to the cache as [B,KV,hd,S] (see KVCache) and are attended in that layout
        k_all, v_all, layer, index = kv
        k = jnp.swapaxes(k, 2, 3)
        zero = jnp.zeros((), jnp.int32)
        if layer is None:  # this layer's own cache: updated in place, attended directly
            k_all = jax.lax.dynamic_update_slice(k_all, k.astype(k_all.dtype), (zero, zero, zero, index))
            v_all = jax.lax.dynamic_update_slice(v_all, v.astype(v_all.dtype), (zero, zero, index, zero))
            k, v = k_all.astype(dt), v_all.astype(dt)
        else:
            k_all = jax.lax.dynamic_update_slice(k_all, k[None].astype(k_all.dtype), (layer, zero, zero, zero, index))
            v_all = jax.lax.dynamic_update_slice(v_all, v[None].astype(v_all.dtype), (layer, zero, zero, index, zero))
            k = jax.lax.dynamic_index_in_dim(k_all, layer, 0, keepdims=False).astype(dt)
            v = jax.lax.dynamic_index_in_dim(v_all, layer, 0, keepdims=False).astype(dt)
        kv = (k_all, v_all)
    else:
        own = (k, v)  # no cache: this layer's keys/values [B,KV,S,hd], for forward(kv_out=True)
    if prefix is not None:
        attn = attention.with_prefix(q, k, v, mask, prefix[0].astype(dt), prefix[1].astype(dt), prefix[2],
                                     keys_t=kv is not None)
    elif kv is None and no_cache_kernel(cfg) == "blocked":  # mask: the keys' validity bool[B, S]
        attn = attention.blocked_causal(q, k, v, mask)
    elif kv is None and no_cache_kernel(cfg) == "cudnn":
        attn = attention.flash(q, k, v, mask, implementation="cudnn")
    elif kv is None and no_cache_kernel(cfg) == "splash":
        attn = attention.splash(q, k, v, mask)
    else:
        attn = attention.plain(q, k, v, mask, keys_t=kv is not None)
    x = x + _proj(attn, p, "o_proj", lora_scale, contract=2)
    x = constrain(x, ("batch", "length", "embed"))
    h = _rms_norm(x, p["post_attn_norm"], cfg.rms_norm_eps)
    gate = constrain(_proj(h, p, "gate_proj", lora_scale), ("batch", "length", "mlp"))
    up = constrain(_proj(h, p, "up_proj", lora_scale), ("batch", "length", "mlp"))
    x = x + _proj(jax.nn.silu(gate) * up, p, "down_proj", lora_scale)
    return constrain(x, ("batch", "length", "embed")), (kv if kv is not None else own)


class Transformer(nnx.Module):
    """Decoder-only LM. `Transformer(cfg, rngs=nnx.Rngs(0))`; call = `forward` on the live module."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs | None = None):
        rngs = nnx.Rngs(0) if rngs is None else rngs
        params = _init_params(cfg, rngs.params())
        self.cfg = cfg
        self.embed_tokens = params["embed_tokens"]
        self.layers = Layers({k.removeprefix("layers."): v for k, v in params.items() if k.startswith("layers.")})
        self.norm = params["norm"]
        self.lm_head = params.get("lm_head")

    def __call__(self, tokens: jax.Array, positions: jax.Array, token_mask: jax.Array,
                 cache: KVCache | None = None, prefix: KVCache | None = None, head: bool = True,
                 prefix_rows: jax.Array | None = None, ring: bool = False,
                 lora: tuple[dict[str, jax.Array], float] | None = None,
                 kv_out: bool = False) -> tuple[jax.Array, KVCache | Prefix | None]:
        cfg = self.cfg
        trained = isinstance(prefix, Prefix)  # the no-cache forward of prompt continuations (training)
        if trained and (cache is not None or prefix_rows is None):
            raise ValueError("a Prefix (from forward(kv_out=True)) is attended without a cache, with prefix_rows.")
        if prefix is not None and cache is None and not trained:
            raise ValueError("a shared prefix is attended from a KV cache: pass cache= with prefix=.")
        if kv_out and cache is not None:
            raise ValueError("kv_out returns the keys/values of a no-cache forward; a cache holds them already.")
        if ring and (cache is None or tokens.shape[1] != 1):
            raise ValueError("a ring cache takes one token per row per call (decode).")
        dt = DTYPES[cfg.dtype]
        if tokens.ndim != 2 or positions.shape != tokens.shape or token_mask.shape != tokens.shape:
            raise ValueError(f"tokens, positions and token_mask must share one [batch, seq] shape, got "
                             f"{tokens.shape}, {positions.shape}, {token_mask.shape}.")
        B, S = tokens.shape
        token_mask = token_mask.astype(bool)
        x = jnp.take(self.embed_tokens[...], tokens, axis=0, mode="clip").astype(dt)  # clip: no NaN from pad ids
        x = constrain(x, ("batch", "length", "embed"))
        angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(rope_inv_freq(cfg))
        cos, sin = jnp.cos(angles), jnp.sin(angles)
        if cache is None:  # the O(S) kernels build their masks per tile from the keys' validity
            t = jnp.arange(S)
            mask = ((t[None, :] <= t[:, None])[None] & token_mask[:, None, :]
                    if no_cache_kernel(cfg) == "plain" or trained else token_mask)
            valid = index = None
        else:
            index = cache.index.astype(jnp.int32)
            valid = jax.lax.dynamic_update_slice(cache.valid, token_mask, (jnp.zeros((), jnp.int32), index))
            if ring:  # slots hold keys of one row in any order: what is valid is what the row wrote
                mask = valid[:, None, :]
            else:
                slot = index + jnp.arange(S)
                mask = (jnp.arange(cache.valid.shape[1])[None, :] <= slot[:, None])[None] & valid[:, None, :]

        rows_valid = gather_prefix_rows(prefix.valid, prefix_rows) if trained else None  # once, not per layer

        def layer_prefix(layer, own=None):
            if trained:  # own: this layer's (k, v) [P,KV,W,hd], scanned with the parameters
                return gather_prefix_rows(own[0], prefix_rows), gather_prefix_rows(own[1], prefix_rows), rows_valid
            if prefix is None:
                return None
            if isinstance(prefix.k, (tuple, list)):
                k, v = prefix.k[layer], prefix.v[layer]
            else:
                pick = lambda a: jax.lax.dynamic_index_in_dim(a, layer, 0, keepdims=False)  # noqa: E731
                k, v = pick(prefix.k), pick(prefix.v)
            if prefix_rows is None:
                return k, v, prefix.valid
            return k[prefix_rows], v[prefix_rows], prefix.valid[prefix_rows]  # row b attends prompt prefix_rows[b]

        adapters, lora_scale = lora if lora is not None else ({}, 0.0)

        def body(carry, xs):
            x, kv, layer = carry
            p, own = xs
            x, out = _block(cfg, x, p, cos, sin, mask, None if kv is None else (*kv, layer, index),
                            layer_prefix(layer, own), lora_scale)
            return (x, out if kv is not None else None, layer + 1), (out if kv_out else None)

        policy = REMAT_POLICIES[cfg.remat]
        if cfg.remat != "none":
            body = jax.checkpoint(body, policy=policy, prevent_cse=False)
        if cfg.scan_layers:
            if isinstance(self.layers.input_norm.get_value(), (tuple, list)):
                raise ValueError("per-layer parameters (unstack_layers) need an unrolled stack (scan_layers=False).")
            kv0 = None if cache is None else (cache.k, cache.v)
            (x, kv, _), kvs = jax.lax.scan(body, (x, kv0, jnp.zeros((), jnp.int32)),
                                           ({**self.layers.stacked(), **adapters},
                                            (prefix.k, prefix.v) if trained else None))
        else:  # unrolled: no stacked residual buffers to fill and slice (faster on CPU, slower to compile)
            if cache is not None and not isinstance(cache.k, (tuple, list)):
                raise ValueError("an unrolled layer stack (scan_layers=False) needs a per-layer cache from "
                                 "init_cache of the same config.")
            def block(x, p, layer_kv, layer_pre):
                return _block(cfg, x, p, cos, sin, mask, layer_kv, layer_pre, lora_scale)

            if cfg.remat != "none":
                block = jax.checkpoint(block, policy=policy, prevent_cse=False)
            stacked, ks, vs = {**self.layers.stacked(), **adapters}, [], []
            for i in range(cfg.num_layers):
                layer_kv = None if cache is None else (cache.k[i], cache.v[i], None, index)
                pre = layer_prefix(i, (prefix.k[i], prefix.v[i]) if trained else None)
                x, out = block(x, {name: w[i] for name, w in stacked.items()}, layer_kv, pre)
                ks.append(out[0])
                vs.append(out[1])
            kv = None if cache is None else (tuple(ks), tuple(vs))
            kvs = (jnp.stack(ks), jnp.stack(vs)) if kv_out else None
        x = _rms_norm(x, self.norm[...], cfg.rms_norm_eps)
        if cache is not None:
            next_index = (index + S) % cache.valid.shape[1] if ring else index + S
        new_cache = None if cache is None else KVCache(k=kv[0], v=kv[1], valid=valid, index=next_index)
        if kv_out:
            new_cache = Prefix(k=kvs[0], v=kvs[1], valid=token_mask)
        if not head:
            return x, new_cache
        logits = jnp.einsum("bsd,dv->bsv", x, self.head_weight().astype(dt), preferred_element_type=jnp.float32)
        logits = constrain(logits, ("batch", "length", "vocab"))
        return logits, new_cache

    def head_weight(self) -> jax.Array:
        """The LM head [hidden, vocab] (the transposed embedding when tied)."""
        return self.embed_tokens[...].T if self.cfg.tie_word_embeddings else self.lm_head[...]


def unstack_layers(params: nnx.State) -> nnx.State:
    """The same parameters with each stacked layer parameter as a tuple of per-layer arrays, for an unrolled
    stack (``scan_layers=False``) run inside a loop: call it once before the loop (inside the same jit), and
    the loop body reads each layer's weights as they are instead of slicing -- i.e. copying -- every layer out
    of the stacked arrays on every iteration (which XLA does not hoist; see bench/RESULTS.md for what it costs)."""
    out = jax.tree.map(lambda x: x, params)  # a new State; the leaves (arrays) are shared
    out["layers"] = jax.tree.map(lambda x: tuple(x[i] for i in range(x.shape[0])), params["layers"])
    return out


def split(model: Transformer) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, params) for the functional hot paths."""
    return nnx.split(model, nnx.Param)


def init(cfg: ModelConfig, seed: int = 0, mesh: jax.sharding.Mesh | None = None) -> tuple[nnx.GraphDef, nnx.State]:
    """Random (graphdef, params) from one compiled program; with `mesh` every param is created sharded.
    Meant for from-scratch CPU/small models; real checkpoints come from `hf.load_pretrained`."""
    graphdef, abstract = split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(seed))))
    shardings = None if mesh is None else param_shardings(abstract, mesh)
    params = jax.jit(lambda: split(Transformer(cfg, rngs=nnx.Rngs(seed)))[1], out_shardings=shardings)()
    return graphdef, params


def forward(graphdef: nnx.GraphDef, params: nnx.State, tokens: jax.Array, positions: jax.Array,
            token_mask: jax.Array, cache: KVCache | None = None, prefix: KVCache | Prefix | None = None,
            head: bool = True, *, prefix_rows: jax.Array | None = None,
            ring: bool = False, kv_out: bool = False) -> tuple[jax.Array, KVCache | Prefix | None]:
    """Pure forward: tokens/positions i32[B,S], token_mask bool[B,S] -> (logits f32[B,S,V], cache).

    Without a cache query s attends key t iff t <= s and token_mask[b, t]. With a cache the S tokens are
    written at slots [index, index + S) (valid[b, slot] = token_mask[b, s]) and query s attends slot j iff
    j <= index + s and valid[b, j]; the returned cache has index + S. Writing past max_len is not checked
    under jit (the slot would be clamped): size the cache for prompt + completion.

    ``prefix`` (with a cache): a P-row cache of prompts shared by the B = P * n rows (row b continues prompt
    b // n, e.g. from a P-row prefill), attended before the cache's own slots wherever ``prefix.valid``; the
    row's own cache then holds only its continuation (see ``attention.with_prefix``).

    ``prefix_rows`` i32[B]: row b continues prompt ``prefix_rows[b]`` of the prefix (any assignment, e.g. the
    decode slots of continuous batching) instead of b // n. ``ring`` (one token per row): the cache is a ring
    of slots written at ``index`` mod max_len and a row attends exactly its valid slots, in any order (keys
    carry their RoPE positions; a slot reused by a new row is invalidated by the caller).

    Training over shared prompts (no cache): ``kv_out=True`` returns the ``Prefix`` (every layer's keys and
    values) of P prompts as the second output; ``forward(continuations, prefix=that, prefix_rows=...)`` runs
    rows that continue them (row b after prompt ``prefix_rows[b]``, see ``gather_prefix_rows`` for the
    per-shard form) and equals the forward of the concatenated rows at the continuation's positions, gradients
    flowing into the prompts' pass (the attention is ``attention.with_prefix``'s, whatever ``cfg.attention``).

    ``params`` may be a ``lora.LoraParams`` (base parameters + adapters): the adapted model, unmerged.

    ``head=False`` returns the final-norm hidden states [B,S,hidden] (compute dtype) instead of the logits,
    for callers that apply ``head_weight`` themselves a chunk of positions at a time
    (``losses.chunked_shifted_logprobs_and_entropy``).
    """
    lora = None
    if hasattr(params, "adapters"):  # lora.LoraParams: the adapted model, unmerged; the adapters join the
        adapters = {f"{name}.{part}": v[...]  # per-layer parameter dict as "<proj>.lora_a" / ".lora_b"
                    for name, ab in params.adapters.items() for part, v in ab.items()}
        params, lora = params.base, (adapters, params.scale)
    model = nnx.merge(graphdef, params)
    if prefix is None and head and not ring and lora is None and not kv_out:  # any module with the (tokens,
        return model(tokens, positions, token_mask, cache)                    # positions, token_mask, cache) call
    return model(tokens, positions, token_mask, cache, prefix=prefix, head=head, prefix_rows=prefix_rows,
                 ring=ring, lora=lora, kv_out=kv_out)


def head_weight(graphdef: nnx.GraphDef, params: nnx.State) -> jax.Array:
    """The model's LM head [hidden, vocab] (the transposed embedding when tied; LoRA leaves it as it is)."""
    return nnx.merge(graphdef, getattr(params, "base", params)).head_weight()
