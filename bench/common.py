"""Shared pieces of the CPU benchmarks against PyTorch: timing and one random model in both frameworks."""
from __future__ import annotations

import statistics
import tempfile
import time
from typing import Any, Callable


def interleaved_times(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
    """Wall-clock seconds of ``repeats`` rounds in which every function runs once, in turn.

    On a shared machine the load drifts over minutes; alternating the contenders makes each round's
    comparison see the same conditions, so best-vs-best and the median of per-round ratios are both fair."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def median_ratio(times: dict[str, list[float]], slow: str | list[str], fast: str) -> float:
    """Median over rounds of (time of ``slow`` / time of ``fast``); with several ``slow`` names the fastest
    of them counts in each round."""
    slow = [slow] if isinstance(slow, str) else slow
    return statistics.median(min(times[s][i] for s in slow) / t for i, t in enumerate(times[fast]))


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
