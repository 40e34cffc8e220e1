"""Local Hugging Face checkpoints <-> the NNX `Transformer` (config.json + safetensors), and tokenizers.

Name mapping (HF tensor -> NNX param; L = layer, stacked on the leading axis of `layers.*`):
  model.embed_tokens.weight [V, D]                   -> embed_tokens [V, D]
  model.layers.L.input_layernorm.weight [D]          -> layers.input_norm [L, D]
  model.layers.L.self_attn.{q,k,v}_proj.weight [N*hd, D] -> layers.{q,k,v}_proj [L, D, N, hd]   (W.T, split heads)
  model.layers.L.self_attn.{q,k,v}_proj.bias [N*hd]  -> layers.{q,k,v}_bias [L, N, hd]         (Qwen2)
  model.layers.L.self_attn.o_proj.weight [D, H*hd]   -> layers.o_proj [L, H, hd, D]
  model.layers.L.self_attn.{q,k}_norm.weight [hd]    -> layers.{q,k}_norm [L, hd]              (Qwen3)
  model.layers.L.post_attention_layernorm.weight [D] -> layers.post_attn_norm [L, D]
  model.layers.L.mlp.{gate,up}_proj.weight [F, D]    -> layers.{gate,up}_proj [L, D, F]        (W.T)
  model.layers.L.mlp.down_proj.weight [D, F]         -> layers.down_proj [L, F, D]             (W.T)
  model.norm.weight [D] -> norm [D];  lm_head.weight [V, D] -> lm_head [D, V] (absent/ignored when tied)
Safetensors are read through a memory map of each file (own header parser: numpy has no bfloat16, and a
transposed view lets each device read only its shard), so no full copy of the model is made on one device.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np
from flax import nnx

from passk_jax.models.families import BY_HF_ARCHITECTURE, FAMILIES
from passk_jax.models.transformer import DTYPES, ModelConfig, Transformer
from passk_jax.parallel import param_shardings, to_host
from passk_jax.tokenizer import build_char_tokenizer, char_alphabet, load_tokenizer

SUPPORTED_ARCHITECTURES = {arch: f.name for arch, f in BY_HF_ARCHITECTURE.items()}  # from families.FAMILIES
_ST_DTYPES = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16),
              "F64": np.dtype(np.float64)}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                    "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt", "tokenizer.model")
_ARCH_KEYS = {"architectures", "model_type", "torch_dtype", "dtype", "rope_scaling", "rope_parameters", "rope_theta",
              "transformers_version", "head_dim", "attention_bias", "mlp_bias", "use_sliding_window"}

LAYER_NAMES = {  # NNX name under `layers` -> (HF suffix after "model.layers.{i}.", layout kind)
    "input_norm": ("input_layernorm.weight", "id"),
    "q_proj": ("self_attn.q_proj.weight", "in_heads"),
    "k_proj": ("self_attn.k_proj.weight", "in_heads"),
    "v_proj": ("self_attn.v_proj.weight", "in_heads"),
    "q_bias": ("self_attn.q_proj.bias", "heads"),
    "k_bias": ("self_attn.k_proj.bias", "heads"),
    "v_bias": ("self_attn.v_proj.bias", "heads"),
    "o_proj": ("self_attn.o_proj.weight", "out_heads"),
    "q_norm": ("self_attn.q_norm.weight", "id"),
    "k_norm": ("self_attn.k_norm.weight", "id"),
    "post_attn_norm": ("post_attention_layernorm.weight", "id"),
    "gate_proj": ("mlp.gate_proj.weight", "T"),
    "up_proj": ("mlp.up_proj.weight", "T"),
    "down_proj": ("mlp.down_proj.weight", "T"),
}
TOP_NAMES = {"embed_tokens": ("model.embed_tokens.weight", "id"), "norm": ("model.norm.weight", "id"),
             "lm_head": ("lm_head.weight", "T")}


# ---------------------------------------------------------------- layouts
def _hf_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    if kind == "id":
        return tuple(shape)
    if kind == "T":
        return tuple(shape[::-1])
    if kind == "in_heads":  # ours [D, N, hd]
        return (shape[1] * shape[2], shape[0])
    if kind == "heads":  # ours [N, hd]
        return (shape[0] * shape[1],)
    return (shape[2], shape[0] * shape[1])  # out_heads, ours [H, hd, D]


def _to_ours(a: np.ndarray, kind: str, shape: tuple[int, ...]) -> np.ndarray:
    """View of an HF tensor in our layout (no copy for memory maps)."""
    if kind == "id":
        return a
    if kind == "heads":
        return a.reshape(shape)
    return a.T.reshape(shape)  # T, in_heads, out_heads


def _to_hf(x: np.ndarray, kind: str) -> np.ndarray:
    if kind == "id":
        return x
    if kind == "T":
        return x.T
    if kind == "in_heads":
        return x.reshape(x.shape[0], -1).T
    if kind == "heads":
        return x.reshape(-1)
    return x.reshape(-1, x.shape[-1]).T  # out_heads


def _plan(cfg: ModelConfig, state: nnx.State) -> list[tuple[tuple[str, ...], nnx.Variable, list[str], str]]:
    """[(nnx path, variable, HF names (one per layer for stacked params), kind)]."""
    plan = []
    for path, var in nnx.to_flat_state(state):
        path = tuple(str(p) for p in path)
        if path[0] == "layers":
            suffix, kind = LAYER_NAMES[path[1]]
            names = [f"model.layers.{i}.{suffix}" for i in range(cfg.num_layers)]
        else:
            name, kind = TOP_NAMES[path[0]]
            names = [name]
        plan.append((path, var, names, kind))
    return plan


# ---------------------------------------------------------------- configs
def config_from_hf(hf: dict, *, dtype: str = "float32", param_dtype: str = "float32", **overrides: Any) -> ModelConfig:
    """ModelConfig from a config.json dict (transformers 4 `rope_theta/rope_scaling` or 5 `rope_parameters`)."""
    archs = hf.get("architectures") or []
    model_type = hf.get("model_type")
    arch = archs[0] if archs else FAMILIES[model_type].hf_architecture if model_type in FAMILIES else model_type
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}.")
    fam = BY_HF_ARCHITECTURE[arch]
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {hf['hidden_act']!r} is not supported (only 'silu').")
    if hf.get("use_sliding_window", False):
        raise ValueError(f"{arch} with use_sliding_window=true is not supported.")
    if not fam.attention_bias and (hf.get("attention_bias", False) or hf.get("mlp_bias", False)):
        raise ValueError(f"{arch} with attention_bias/mlp_bias=true is not supported.")
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or fam.default_head_dim or hf["hidden_size"] // heads
    rope = dict(hf.get("rope_parameters") or {})
    theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
    if not rope:
        rope = dict(hf.get("rope_scaling") or {})
    if "type" in rope:
        rope["rope_type"] = rope.pop("type")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"{arch} with partial_rotary_factor={rope['partial_rotary_factor']} is not supported.")
    scaling = None if rope.get("rope_type", "default") == "default" else rope
    fields = dict(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"], num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=head_dim, rope_theta=float(theta), rope_scaling=scaling, rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)), attention_bias=fam.attention_bias,
        qk_norm=fam.qk_norm, max_position_embeddings=hf.get("max_position_embeddings", 4096),
        dtype=dtype, param_dtype=param_dtype, family=fam.name)
    return ModelConfig(**{**fields, **overrides})


def config_to_hf(cfg: ModelConfig, dtype: str | None = None) -> dict:
    """config.json dict that transformers (4 and 5) reads back as the same architecture."""
    fam = FAMILIES[cfg.family]
    if cfg.attention_bias != fam.attention_bias or cfg.qk_norm != fam.qk_norm:
        raise ValueError(f"family {cfg.family!r} with attention_bias={cfg.attention_bias}, qk_norm={cfg.qk_norm} "
                         f"has no Hugging Face equivalent (qwen2: biases, qwen3: q/k norm, llama: neither).")
    rope = {"rope_theta": cfg.rope_theta, "rope_type": "default", **(cfg.rope_scaling or {})}
    hf = dict(
        architectures=[fam.hf_architecture], model_type=cfg.family, vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
        hidden_act="silu", max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=cfg.tie_word_embeddings, rope_parameters=rope, rope_theta=cfg.rope_theta,
        dtype=dtype or cfg.param_dtype)
    if cfg.rope_scaling:
        hf["rope_scaling"] = dict(cfg.rope_scaling)
    hf.update(fam.hf_export_fields)
    return hf


# ---------------------------------------------------------------- safetensors
def _corrupt(file: Path, why: str) -> ValueError:
    return ValueError(f"weight file {file} is truncated or corrupt: {why}; re-copy or re-export the checkpoint.")


def _is_count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _read_header(file: Path) -> tuple[dict, int]:
    """(tensor entries, start of the data) of one safetensors file, checked before anything is read: a
    readable header, ordered `data_offsets` spanning prod(shape) * itemsize bytes (for the dtypes we know)
    and a file long enough for all of them; ValueError naming the file otherwise."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise _corrupt(file, f"unreadable safetensors header (the file holds {size} bytes, fewer than the "
                                 f"8-byte header length)")
        (n,) = struct.unpack("<Q", prefix)
        if 8 + n > size:
            raise _corrupt(file, f"unreadable safetensors header (its length prefix says {n} bytes but the file "
                                 f"holds {size - 8} after it)")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
            raise _corrupt(file, f"unreadable safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise _corrupt(file, f"unreadable safetensors header (a JSON {type(header).__name__}, not an object)")
    header.pop("__metadata__", None)
    data_end = 0
    for name, t in header.items():
        entry = t if isinstance(t, dict) else {}
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not (isinstance(dtype, str) and isinstance(shape, list) and all(map(_is_count, shape))
                and isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))
                and offsets[0] <= offsets[1]):
            raise _corrupt(file, f"unreadable safetensors header (tensor {name} has a malformed entry "
                                 f"{json.dumps(t)[:200]})")
        if dtype in _ST_DTYPES:  # unknown dtypes fail in `_Tensors.get`, if the tensor is ever read
            need = int(np.prod(shape, dtype=np.int64)) * _ST_DTYPES[dtype].itemsize
            if offsets[1] - offsets[0] != need:
                raise _corrupt(file, f"tensor {name} spans {offsets[1] - offsets[0]} bytes but its shape "
                                     f"{tuple(shape)} and dtype {dtype} need {need}")
        data_end = max(data_end, offsets[1])
    if size < 8 + n + data_end:
        raise _corrupt(file, f"its header describes {data_end} bytes of tensor data but the file holds "
                             f"{size - 8 - n}")
    return header, 8 + n


class _Tensors:
    """Lazy tensors of a checkpoint directory (single file or sharded with model.safetensors.index.json)."""

    def __init__(self, path: Path):
        index = path / "model.safetensors.index.json"
        if index.is_file():
            files = sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
        else:
            files = sorted(path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors weights found in {path} (only safetensors checkpoints are "
                                    f"supported).")
        self.entries: dict[str, tuple[Path, str, tuple[int, ...], int, int]] = {}
        for file in files:
            if not file.is_file():
                raise FileNotFoundError(f"weight file {file} listed in the index does not exist.")
            header, start = _read_header(file)
            for name, t in header.items():
                self.entries[name] = (file, t["dtype"], tuple(t["shape"]), start + t["data_offsets"][0],
                                      start + t["data_offsets"][1])
        self._maps: dict[Path, np.memmap] = {}

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][2]

    def get(self, name: str) -> np.ndarray:
        file, dtype, shape, begin, end = self.entries[name]
        if dtype not in _ST_DTYPES:
            raise ValueError(f"tensor {name} has dtype {dtype}, supported: {', '.join(_ST_DTYPES)}.")
        if file not in self._maps:
            self._maps[file] = np.memmap(file, dtype=np.uint8, mode="r")
        return self._maps[file][begin:end].view(_ST_DTYPES[dtype]).reshape(shape)


def _preview(names: list[str], limit: int = 8) -> str:
    more = f" ... (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


# ---------------------------------------------------------------- load / save
def load_pretrained(path: str | os.PathLike, *, dtype: str = "float32", param_dtype: str = "float32",
                    mesh: jax.sharding.Mesh | None = None, **config_overrides: Any) -> tuple[Transformer, ModelConfig]:
    """Load a local HF checkpoint directory; each param is placed with its logical sharding on `mesh` (default:
    the first device) and each device reads only its own shard from the memory-mapped files."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {path}: expected a local Hugging Face checkpoint directory.")
    cfg = config_from_hf(json.loads((path / "config.json").read_text()), dtype=dtype, param_dtype=param_dtype,
                         **config_overrides)
    tensors = _Tensors(path)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    plan = _plan(cfg, state)

    expected = {n: (kind, tuple(var.shape[1:]) if p[0] == "layers" else tuple(var.shape))
                for p, var, names, kind in plan for n in names}
    present = {n for n in tensors.entries if not n.endswith(_IGNORED_SUFFIXES)}
    if cfg.tie_word_embeddings:
        present.discard("lm_head.weight")
    missing, unexpected = sorted(set(expected) - present), sorted(present - set(expected))
    if missing or unexpected:
        parts = ([f"missing tensors [{_preview(missing)}]"] if missing else []) + (
            [f"unexpected tensors [{_preview(unexpected)}]"] if unexpected else [])
        raise ValueError(f"checkpoint {path} does not match its config.json: {' and '.join(parts)}.")
    bad = [f"{n} {tensors.shape(n)} (expected {_hf_shape(k, s)})" for n, (k, s) in expected.items()
           if tensors.shape(n) != _hf_shape(k, s)]
    if bad:
        raise ValueError(f"checkpoint {path} has tensors whose shapes do not match config.json: {_preview(bad)}.")

    np_dtype = np.dtype(DTYPES[param_dtype])
    if mesh is not None:
        shardings = [v.get_value() for _, v in nnx.to_flat_state(param_shardings(state, mesh))]
    else:
        shardings = [jax.sharding.SingleDeviceSharding(jax.devices()[0])] * len(plan)
    for (p, var, names, kind), sharding in zip(plan, shardings):
        shape = tuple(var.shape)
        if p[0] == "layers":
            def read(idx, names=names, kind=kind, shape=shape):
                rows = [_to_ours(tensors.get(names[i]), kind, shape[1:])[idx[1:]].astype(np_dtype)
                        for i in range(shape[0])[idx[0]]]
                return np.stack(rows) if rows else np.zeros((0, *shape[1:]), np_dtype)[idx[1:]]
        else:
            def read(idx, name=names[0], kind=kind, shape=shape):
                return _to_ours(tensors.get(name), kind, shape)[idx].astype(np_dtype)
        var.set_value(jax.make_array_from_callback(shape, sharding, read))
    return nnx.merge(graphdef, state), cfg


def save_pretrained(model_or_split: Transformer | tuple[nnx.GraphDef, nnx.State], cfg: ModelConfig,
                    path: str | os.PathLike, *, dtype: str | None = None, tokenizer: Any = None,
                    tokenizer_source: str | os.PathLike | None = None, extra_config: dict | None = None) -> None:
    """Write config.json + model.safetensors (+ the tokenizer if given) for AutoModelForCausalLM.

    `dtype` casts the saved weights (default: the param dtype); `extra_config` (e.g. the original config.json,
    for eos/bos ids) is merged under the architecture fields; the tokenizer is written by `save_tokenizer`
    (`tokenizer_source` is its `source`). Every process must call it; process 0 writes.
    """
    path = Path(path)
    if (path / "model.safetensors.index.json").exists():
        raise ValueError(f"{path} already holds a sharded checkpoint (model.safetensors.index.json); save to a "
                         f"fresh directory so transformers does not load the old shards.")
    if isinstance(model_or_split, Transformer):
        state = nnx.state(model_or_split, nnx.Param)
    else:
        state = model_or_split[1]
    out_dtype = np.dtype(DTYPES[dtype or cfg.param_dtype])
    extra = {k: v for k, v in (extra_config or {}).items() if k not in _ARCH_KEYS}
    hf_config = {**extra, **config_to_hf(cfg, dtype=dtype)}

    entries: list[tuple[str, tuple[int, ...], Callable[[], np.ndarray]]] = []
    for p, var, names, kind in _plan(cfg, state):
        value = var.get_value()
        if p[0] == "layers":
            for i, name in enumerate(names):
                entries.append((name, _hf_shape(kind, tuple(value.shape[1:])),
                                lambda value=value, i=i, kind=kind: _to_hf(to_host(value[i]), kind)))
        else:
            entries.append((names[0], _hf_shape(kind, tuple(value.shape)),
                            lambda value=value, kind=kind: _to_hf(to_host(value), kind)))
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, _ in entries:
        size = int(np.prod(shape)) * out_dtype.itemsize
        header[name] = {"dtype": _ST_NAMES[out_dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)

    writer = jax.process_index() == 0
    if writer:
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
        f = open(path / "model.safetensors", "wb")
        f.write(struct.pack("<Q", len(blob)) + blob)
    try:
        for _, _, fetch in entries:  # every process joins the gathers; only process 0 writes
            data = np.ascontiguousarray(fetch().astype(out_dtype))
            if writer:
                f.write(data.tobytes())
    finally:
        if writer:
            f.close()
    if tokenizer is not None:
        save_tokenizer(tokenizer, path, source=tokenizer_source)


def save_tokenizer(tokenizer: Any, path: str | os.PathLike, *, source: str | os.PathLike | None = None) -> None:
    """Write `tokenizer` into the checkpoint directory `path` so that `AutoTokenizer.from_pretrained(path)` gives
    the same ids, text, special tokens and chat template as `tokenizer`. AutoTokenizer picks its class from
    path/config.json (Qwen2Tokenizer for model_type qwen2, whatever tokenizer_config.json names), and
    Qwen2Tokenizer rebuilds its own pipeline around tokenizer.json's vocabulary and merges, so:
      * `source` (the local directory `tokenizer` was loaded from unchanged, e.g. model.hf_path): its tokenizer
        files are copied verbatim, so AutoTokenizer rebuilds exactly what `load_tokenizer(source)` built (the
        exported config.json keeps the source's model_type);
      * a character tokenizer (`char_alphabet` is not None): written in the byte-level format of
        `build_char_tokenizer`, which Qwen2Tokenizer reads back exactly; one in the older WordLevel format (an old
        run's WORKDIR/tokenizer) is converted, same ids;
      * anything else: `tokenizer.save_pretrained(path)`.
    Process 0 writes; the others return."""
    if jax.process_index() != 0:
        return
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if source is not None:
        source = Path(source)
        for name in sorted({*_TOKENIZER_FILES, *tokenizer.vocab_files_names.values()}):
            if (source / name).is_file():
                shutil.copyfile(source / name, path / name)
        if (source / "additional_chat_templates").is_dir():
            shutil.copytree(source / "additional_chat_templates", path / "additional_chat_templates",
                            dirs_exist_ok=True)
        return
    alphabet = char_alphabet(tokenizer)
    (tokenizer if alphabet is None else build_char_tokenizer(alphabet)).save_pretrained(str(path))


__all__ = ["SUPPORTED_ARCHITECTURES", "config_from_hf", "config_to_hf", "load_pretrained", "save_pretrained",
           "save_tokenizer", "load_tokenizer"]
