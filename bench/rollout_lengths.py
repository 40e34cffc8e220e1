"""Continuous batching vs lockstep decoding on a long-tailed workload.

    python -m bench.rollout_lengths [--presets tiny,small] [--rows 256] [--new 512] [--slots 32,64,128]
        [--repeats 2]

Random `tiny` / `small` weights with a 512-token vocabulary; EOS is a set of ``--eos`` ids, so on these
near-uniform random models a row stops at each token with probability about eos/512: lengths are roughly
geometric (mean about max_new_tokens / 4 at the defaults), capped at ``--new``. P x n = ``--rows`` rows
(16 samples per prompt). Every contender samples the same rows with the same key, so the tokens are
identical (checked): lockstep decoding (`decode_slots=0`) and continuous batching over each slot count.
After one warm-up each (compilation), ``--repeats`` rounds run every contender once in turn (the CPU load
drifts; alternating keeps the comparison fair).

Columns: useful tokens/s (completion tokens, EOS included, per second of `sample`), the median over rounds of
the per-round speed-up against lockstep, and slot utilisation = useful tokens / (decode steps x rows in
flight): lockstep runs max(length) steps over all rows; the slot schedule is replayed on the host from the
lengths (each slot takes the next row as soon as its row ends, one step per token).
"""
from __future__ import annotations

import argparse
import heapq
import time

import jax
import numpy as np

from bench.common import interleaved_times, median_ratio
from passk_jax.models.transformer import ModelConfig, init
from passk_jax.sampling import Sampler

VOCAB = 512


def slot_steps(lengths: np.ndarray, slots: int) -> int:
    """Decode iterations of ``slots`` slots taking rows in order, a row of length L occupying its slot for L."""
    free = [0] * slots
    for length in lengths:
        heapq.heappush(free, heapq.heappop(free) + int(length))
    return max(free)


def bench_preset(preset: str, rows: int, new: int, slots: list[int], eos: int, repeats: int) -> list[str]:
    cfg = getattr(ModelConfig, preset)(vocab_size=VOCAB, max_position_embeddings=new + 64)
    graphdef, params = init(cfg, seed=0)
    sampler = Sampler(graphdef, cfg)
    weights = sampler.prepare(params)
    n = 16
    rng = np.random.default_rng(0)
    prompts = [rng.integers(eos + 1, VOCAB, 24).tolist() for _ in range(rows // n)]
    kw = dict(num_samples=n, max_new_tokens=new, temperature=1.0, eos_ids=list(range(1, eos + 1)),
              key=jax.random.PRNGKey(0))
    outs = {}

    def run(s):
        def go():
            out = sampler.sample(weights, prompts, decode_slots=s, **kw)
            outs[s] = jax.block_until_ready(out)
        return go

    names = {"lockstep": 0, **{f"slots={s}": s for s in slots}}
    for fn in (run(s) for s in names.values()):
        fn()  # warm-up: compile
    times = interleaved_times({name: run(s) for name, s in names.items()}, repeats)
    lengths = np.asarray(outs[0].lengths)
    for s in slots:
        np.testing.assert_array_equal(np.asarray(outs[s].tokens), np.asarray(outs[0].tokens))
    useful = int(lengths.sum())
    lines = [f"{preset}: {rows} rows, max_new_tokens {new}, lengths mean {lengths.mean():.0f} median "
             f"{np.median(lengths):.0f} max {lengths.max()} ({(lengths == new).mean():.0%} at the cap); "
             f"tokens identical across contenders",
             f"  {'decode':<12}{'useful tok/s':>14}{'vs lockstep':>13}{'utilisation':>13}"]
    for name, s in names.items():
        util = useful / (lengths.max() * rows) if s == 0 else useful / (slot_steps(lengths, s) * s)
        ratio = "1.00x" if s == 0 else f"{median_ratio(times, 'lockstep', name):.2f}x"
        lines.append(f"  {name:<12}{useful / min(times[name]):>14,.0f}{ratio:>13}{util:>12.0%}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", default="tiny,small")
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--new", type=int, default=512)
    ap.add_argument("--slots", default="32,64,128")
    ap.add_argument("--eos", type=int, default=4, help="how many token ids end a row")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    t0 = time.perf_counter()
    for preset in args.presets.split(","):
        print("\n".join(bench_preset(preset, args.rows, args.new, [int(s) for s in args.slots.split(",")],
                                     args.eos, args.repeats)), flush=True)
    print(f"({time.perf_counter() - t0:.0f} s; {jax.devices()[0].device_kind})")


if __name__ == "__main__":
    main()
