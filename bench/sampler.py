"""Sampler throughput vs `transformers` generate (PyTorch, CPU), same random Qwen2 weights.

    python -m bench.sampler [--presets tiny,small] [--prompts 16] [--samples 8] [--new 128] [--repeats 2]

Both sides: P prompts of random lengths in [16, 32] (HF gets them left-padded with an attention mask),
n samples each, exactly `new` tokens (no EOS stopping), temperature 1, no top-p / top-k.  After one warm-up
each (JAX: the warm-up compiles), `repeats` rounds run every contender once in turn (the CPU is shared and
its load drifts; alternating keeps the comparison fair).  The ratio column is best against best (the least
disturbed runs); the median column is the median over rounds of that round's ratio.  HF runs with torch's
default thread count and with 1 thread (on a busy machine OpenMP spin-waiting can make the default several
times slower); the ratio is against the faster.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
import torch
import transformers

from bench.common import interleaved_times, median_ratio, twin_models
from passk_jax.sampling import Sampler


def bench_preset(preset: str, n_prompts: int, n_samples: int, new: int, repeats: int) -> dict:
    model, graphdef, params, cfg = twin_models(preset)
    model.eval()
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, cfg.vocab_size, rng.integers(16, 33)).tolist() for _ in range(n_prompts)]
    rows_tokens = n_prompts * n_samples * new

    sampler = Sampler(graphdef, cfg)
    params = sampler.prepare(params)  # the decode copy is made once per policy update, not per call
    keys = iter(range(1000))

    def run_jax():
        out = sampler.sample(params, prompts, num_samples=n_samples, max_new_tokens=new, temperature=1.0,
                             key=jax.random.key(next(keys)))
        jax.block_until_ready(out)
        assert int(out.lengths.min()) == new

    t0 = time.perf_counter()
    run_jax()
    jax_first = time.perf_counter() - t0

    width = max(map(len, prompts))
    ids = torch.zeros((n_prompts, width), dtype=torch.long)
    mask = torch.zeros((n_prompts, width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    gen = dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, num_return_sequences=n_samples,
               max_new_tokens=new, min_new_tokens=new, eos_token_id=None, pad_token_id=0)

    def run_hf(max_new=new):
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, **{**gen, "max_new_tokens": max_new,
                                                                         "min_new_tokens": max_new})
        assert out.shape == (n_prompts * n_samples, width + max_new)

    threads = torch.get_num_threads()
    fns = {}
    for n_threads in sorted({threads, 1}, reverse=True):
        torch.set_num_threads(n_threads)
        run_hf(4)  # warm-up

        def run_hf_threads(n_threads=n_threads):
            torch.set_num_threads(n_threads)
            run_hf()
        fns[f"hf{n_threads}"] = run_hf_threads
    fns["jax"] = run_jax
    times = interleaved_times(fns, repeats)
    torch.set_num_threads(threads)
    hf_names = [k for k in fns if k.startswith("hf")]
    return dict(preset=preset, params=cfg.num_params(), jax=rows_tokens / min(times["jax"]), jax_first=jax_first,
                hf={int(k[2:]): rows_tokens / min(times[k]) for k in hf_names},
                median_ratio=median_ratio(times, hf_names, "jax"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="tiny,small")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    print(f"{args.prompts} prompts x {args.samples} samples, {args.new} new tokens, T=1; "
          f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), transformers {transformers.__version__}")
    rows = [bench_preset(p, args.prompts, args.samples, args.new, args.repeats)
            for p in args.presets.split(",")]
    print("| preset | params | HF generate tok/s (torch threads) | passk_jax tok/s | ratio vs best HF | "
          "median of per-round ratios | passk_jax first call (s) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        hf_cols = ", ".join(f"{v:,.0f} ({k})" for k, v in r["hf"].items())
        print(f"| {r['preset']} | {r['params'] / 1e6:.1f}M | {hf_cols} | {r['jax']:,.0f} | "
              f"{r['jax'] / max(r['hf'].values()):.2f}x | {r['median_ratio']:.2f}x | {r['jax_first']:.1f} |")


if __name__ == "__main__":
    main()
