"""Pilot of the second study design (DESIGN.md, "Second design: pilot"): where does the mechanism act?

For candidate training distributions (maze sizes) and warm starts (SFT steps), one run with no RL step
(``train.steps=0``: the SFT warm start and its evaluation) on 128 mazes of the training sizes, sampled as the
training rollouts are (N = 32, temperature 1.0, no top-p). Per candidate it records the distribution of the
number of correct responses per maze: ``none`` (0 of 32), ``some`` (1-31: where a group-relative advantage
is non-zero), ``all`` (32 of 32), and pass@1 / pass@4 / pass@32, per size and over all.

    python -m experiments.reproduce.pilot_second [--runs runs/pilot2]    (resumable: a finished row is kept)

Rows go to ``results/pilot2/<label>.json``; the table is printed.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

from experiments.reproduce import stats

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "results", "pilot2")
ROOT = os.path.dirname(os.path.dirname(HERE))
N = 32
# label -> (training / evaluation sizes, SFT steps)
CANDIDATES = {"sizes57_sft300": ((5, 7), 300), "sizes5_sft300": ((5,), 300), "sizes5_sft1000": ((5,), 1000),
              "sizes57_sft1000": ((5, 7), 1000), "sizes5_sft3000": ((5,), 3000)}


def _overrides(sizes: tuple[int, ...], sft_steps: int, cache: str) -> list[str]:
    sizes_s = "(" + ",".join(map(str, sizes)) + ",)"
    values = {"seed": 0, "sft.seed": -1, "sft.steps": sft_steps, "sft.num_examples": 2000, "sft.batch_size": 64,
              "sft.cache_dir": cache, "task.options.train_sizes": sizes_s, "task.options.test_sizes": sizes_s,
              "task.num_train": 4000, "rollout.max_new_tokens": 48, "train.steps": 0, "train.export_hf": False,
              "eval.num_prompts": 128, "eval.num_samples": N, "eval.temperature": 1.0, "eval.top_p": 1.0,
              "eval.greedy": False}
    return [f"--config.{k}={v}" for k, v in values.items()]


def summarise(details: dict) -> dict:
    """Per size and over all: mazes, share solved by none / some / all of the N responses, pass@1/4/N."""
    correct = np.asarray(details["correct"])
    sources = np.asarray(details["data_source"])
    out = {}
    for where in ["all"] + sorted(set(sources.tolist())):
        c = correct if where == "all" else correct[sources == where]
        out[where] = {"mazes": int(len(c)), "none": float(np.mean(c == 0)), "some": float(np.mean((c > 0) & (c < N))),
                      "all": float(np.mean(c == N)),
                      **{f"pass@{k}": float(stats.pass_at_k_per_maze(c, N, k).mean()) for k in (1, 4, N)}}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default=os.path.join(ROOT, "runs", "pilot2"), help="run directories (scratch)")
    args = ap.parse_args(argv)
    os.makedirs(OUT, exist_ok=True)
    for label, (sizes, sft_steps) in CANDIDATES.items():
        path = os.path.join(OUT, f"{label}.json")
        if os.path.exists(path):
            continue
        workdir = os.path.join(args.runs, label)
        cmd = [sys.executable, "-m", "experiments.run", "--config=passk_k4", f"--workdir={workdir}",
               *_overrides(sizes, sft_steps, os.path.join(args.runs, "sft_cache"))]
        subprocess.run(cmd, cwd=ROOT, check=True)
        with open(os.path.join(workdir, "eval_details", "step_000000.json")) as f:
            row = {"label": label, "sizes": list(sizes), "sft_steps": sft_steps, "n": N,
                   "summary": summarise(json.load(f))}
        with open(path, "w") as f:
            json.dump(row, f, indent=1)
    print("| candidate | mazes | none | some | all | pass@1 | pass@4 | pass@32 |\n|---|---|---|---|---|---|---|---|")
    for label in CANDIDATES:
        path = os.path.join(OUT, f"{label}.json")
        if not os.path.exists(path):
            continue
        for where, s in json.load(open(path))["summary"].items():
            print(f"| {label} ({where}) | {s['mazes']} | {s['none']:.2f} | {s['some']:.2f} | {s['all']:.2f} | "
                  f"{s['pass@1']:.3f} | {s['pass@4']:.3f} | {s['pass@32']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
