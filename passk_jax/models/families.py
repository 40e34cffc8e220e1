"""Model families: one table per family, the only place that names a family's architecture constants.

Each `Family` says how the family differs from the common decoder (`transformer.py`), how it maps to a
Hugging Face config.json (`hf.py`), and the shapes of its named checkpoints (from their published
config.json files), which `ModelConfig.named` turns into a config without a checkpoint on disk
(`experiments/plan.py`, `bench/gpu.py`). Pure data: this module imports nothing from the package.
"""
from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class Family:
    name: str                 # ModelConfig.family and config.json "model_type"
    hf_architecture: str      # config.json "architectures"[0]
    attention_bias: bool      # q/k/v projection biases
    qk_norm: bool             # per-head RMSNorm on q and k
    default_head_dim: int | None = None  # head_dim when config.json has none (None: hidden_size // num_heads)
    hf_export_fields: tuple[tuple[str, Any], ...] = ()  # family-specific config.json fields written on export
    checkpoints: tuple[tuple[str, dict[str, Any]], ...] = ()  # (name, ModelConfig fields) of named checkpoints


_QWEN2_CONTEXT = dict(rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=32768)

QWEN2 = Family(
    "qwen2", "Qwen2ForCausalLM", attention_bias=True, qk_norm=False,
    hf_export_fields=(("use_sliding_window", False),),
    checkpoints=(  # Qwen2.5 Instruct checkpoints' config.json
        ("qwen2.5-0.5b", dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24,
                              num_heads=14, num_kv_heads=2, head_dim=64, tie_word_embeddings=True, **_QWEN2_CONTEXT)),
        ("qwen2.5-1.5b", dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_layers=28,
                              num_heads=12, num_kv_heads=2, head_dim=128, tie_word_embeddings=True, **_QWEN2_CONTEXT)),
        ("qwen2.5-7b", dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
                            num_heads=28, num_kv_heads=4, head_dim=128, tie_word_embeddings=False, **_QWEN2_CONTEXT)),
        ("qwen2.5-32b", dict(vocab_size=152064, hidden_size=5120, intermediate_size=27648, num_layers=64,
                             num_heads=40, num_kv_heads=8, head_dim=128, tie_word_embeddings=False, **_QWEN2_CONTEXT)),
    ))
QWEN3 = Family("qwen3", "Qwen3ForCausalLM", attention_bias=False, qk_norm=True, default_head_dim=128,
               hf_export_fields=(("attention_bias", False),))
LLAMA = Family("llama", "LlamaForCausalLM", attention_bias=False, qk_norm=False,
               hf_export_fields=(("attention_bias", False), ("mlp_bias", False)))

FAMILIES: dict[str, Family] = {f.name: f for f in (QWEN2, QWEN3, LLAMA)}
BY_HF_ARCHITECTURE: dict[str, Family] = {f.hf_architecture: f for f in FAMILIES.values()}
CHECKPOINTS: dict[str, dict[str, Any]] = {  # name -> ModelConfig fields, family included
    name: dict(fields, family=f.name, attention_bias=f.attention_bias, qk_norm=f.qk_norm)
    for f in FAMILIES.values() for name, fields in f.checkpoints}
