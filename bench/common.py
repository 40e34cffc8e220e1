"""Shared pieces of the CPU benchmarks against PyTorch: timing and one random model in both frameworks."""
from __future__ import annotations

import tempfile
import time
from typing import Any, Callable


def best_time(fn: Callable[[], Any], repeats: int) -> float:
    """Fastest of ``repeats`` wall-clock runs of ``fn`` (seconds)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def twin_models(preset: str, scan_layers: bool = False, attention: str = "auto"):
    """A random transformers Qwen2 model of ``ModelConfig.<preset>`` shape (torch seed 0) and the same
    weights loaded through ``hf.load_pretrained``: (torch_model, graphdef, params, ModelConfig).
    ``scan_layers=False`` (the trainer's CPU default) unrolls our layer stack; ``attention`` picks the
    no-cache attention kernel (``ModelConfig.attention``)."""
    import torch
    import transformers

    from passk_jax.models import hf
    from passk_jax.models.transformer import ModelConfig, split

    cfg = getattr(ModelConfig, preset)()
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**hf.config_to_hf(cfg)))
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        jmodel, jcfg = hf.load_pretrained(d, scan_layers=scan_layers, attention=attention)
    graphdef, params = split(jmodel)
    return model, graphdef, params, jcfg
