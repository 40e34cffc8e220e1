"""The training study: every Pass@k Training variant from one shared warm start, several seeds each.

Design (the full study; ``--quick`` shrinks every size):
* Data are written once to verl-schema JSONL files (maze generator, data seed 0) and passed to every run
  through ``task.options.train_files/test_files``, so every method and seed trains on the same problem
  pool and is evaluated on the same held-out mazes (the trainer would otherwise regenerate both from
  ``config.seed``, and a warm start shared across seeds could then have seen another seed's test mazes).
* One warm start for all runs: every run sets ``sft.seed = SFT_SEED`` (the SFT data order and cache key),
  so the first run trains and caches the SFT params in the study's private cache and every later run
  reuses them; ``check_shared_warm_start`` verifies it from the runs' metrics.
* ``config.seed`` then changes only the RL randomness: rollout sampling, the data order and the eval
  samples (the model init it also seeds is overwritten by the warm start).
* Each run lives in ``<runs>/<method>/seed<s>``; a finished run (``eval_final.json`` present) is skipped and
  an interrupted one resumes from its checkpoint, so the study can be stopped and restarted.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from typing import Any, Callable, Sequence

import numpy as np

from experiments import configs
from passk_jax.metric_log import read_jsonl

SFT_SEED = 0
DATA_SEED = 0


@dataclasses.dataclass(frozen=True)
class Method:
    key: str       # directory name
    label: str     # row label of the report
    config: str    # named config in experiments/configs


METHODS: tuple[Method, ...] = (
    Method("pass1", "Pass@1", "pass1"),
    Method("passk_full", "Pass@k, full sampling", "passk_full"),
    Method("passk_bootstrap", "Pass@k, bootstrap", "passk_bootstrap"),
    Method("passk_analytic", "Pass@k, analytical", "passk_k4"),
    Method("passk_combination", "Pass@k, combination", "passk_combination"),
    Method("passk_adaptive", "Pass@k, entropy-adaptive", "passk_adaptive"),
    Method("passk_then_pass1", "Pass@k -> Pass@1", "passk_then_pass1"),
)
METHOD_BY_KEY = {m.key: m for m in METHODS}


@dataclasses.dataclass(frozen=True)
class StudySpec:
    """Everything that defines a study; ``overrides`` are dotted config fields applied to every run."""

    name: str
    methods: tuple[str, ...]
    seeds: int
    train_sizes: tuple[int, ...]
    test_sizes: tuple[int, ...]
    num_train: int                 # training problems in the shared pool
    test_per_size: int             # held-out mazes per size
    k: int                         # k of every Pass@k method (Pass@1 keeps k = 1)
    overrides: dict[str, Any]


# Full study: 7 methods x 3 seeds x 40 RL steps of the CPU default (16 prompts x 16 rollouts). Estimated
# 1.5-2 hours on an idle 2-core CPU (a few seconds per RL step, ~1 minute of evaluation per run); not yet
# measured. Difficulty: train on 5x5 and 7x7 (the CPU default), test on 5x5, 7x7 and the unseen 9x9, meant
# to leave the warm start solving most 5x5 mazes, fewer 7x7 and few 9x9 ones ("some but not all"; the
# report checks it per size). max_new_tokens = 48 covers the longest 9x9 shortest path of the test set
# (33 moves). k = 4, N_rollout = 16 (paper: k = 4, N = 32).
FULL = StudySpec(
    name="full", methods=tuple(m.key for m in METHODS), seeds=3,
    train_sizes=(5, 7), test_sizes=(5, 7, 9), num_train=4000, test_per_size=48, k=4,
    overrides={
        "rollout.prompts_per_step": 16, "rollout.num_samples": 16, "rollout.max_new_tokens": 48,
        "train.steps": 40, "train.checkpoint_every": 20, "train.keep_checkpoints": 1,
        "train.export_hf": False, "train.log_every": 5,
        "eval.num_samples": 16, "eval.greedy": True,
        "sft.steps": 300, "sft.num_examples": 2000, "sft.batch_size": 64,
    })

# Quick mode: a smoke test of the whole pipeline (CI), numbers are meaningless.
QUICK = StudySpec(
    name="quick", methods=("pass1", "passk_analytic", "passk_then_pass1"), seeds=1,
    train_sizes=(5,), test_sizes=(5,), num_train=64, test_per_size=4, k=2,
    overrides={
        "rollout.prompts_per_step": 4, "rollout.num_samples": 4, "rollout.max_new_tokens": 12,
        "rollout.decode_slots": 8, "step.warmup_steps": 0, "train.steps": 2, "train.checkpoint_every": 2, "train.keep_checkpoints": 1,
        "train.export_hf": False, "eval.num_samples": 4, "eval.greedy": False,
        "sft.steps": 2, "sft.num_examples": 16, "sft.batch_size": 8,
    })


def make_spec(quick: bool = False, seeds: int | None = None, methods: Sequence[str] | None = None,
              steps: int | None = None) -> StudySpec:
    """The full or quick spec with optional overrides of the number of seeds, the methods and RL steps."""
    spec = QUICK if quick else FULL
    if methods:
        unknown = [m for m in methods if m not in METHOD_BY_KEY]
        if unknown:
            raise ValueError(f"unknown method {unknown[0]!r}; choose from {', '.join(METHOD_BY_KEY)}.")
        spec = dataclasses.replace(spec, methods=tuple(methods))
    if seeds is not None:
        if seeds < 1:
            raise ValueError(f"--seeds must be >= 1, got {seeds}.")
        spec = dataclasses.replace(spec, seeds=seeds)
    if steps is not None:
        spec = dataclasses.replace(spec, overrides={**spec.overrides, "train.steps": steps})
    return spec


# ----------------------------------------------------------------------------------------------- data
def write_data(spec: StudySpec, data_dir: str) -> tuple[str, str, int]:
    """Write the shared train/test pools (JSONL, verl schema); returns (train path, test path, #test)."""
    from passk_jax.tasks.maze import MazeTask
    from passk_jax.tasks.verl_data import write_verl

    os.makedirs(data_dir, exist_ok=True)
    task = MazeTask(template="compact", train_sizes=spec.train_sizes, test_sizes=spec.test_sizes,
                    test_counts={s: spec.test_per_size for s in spec.test_sizes})
    test = task.examples("test", None, DATA_SEED)
    train = task.examples("train", spec.num_train, DATA_SEED)
    paths = os.path.join(data_dir, "train.jsonl"), os.path.join(data_dir, "test.jsonl")
    for examples, path in zip((train, test), paths):
        write_verl(examples, path)
    return paths[0], paths[1], len(test)


# --------------------------------------------------------------------------------------------- configs
def _set(config, dotted: str, value: Any) -> None:
    node = config
    *path, leaf = dotted.split(".")
    for part in path:
        node = node[part]
    node[leaf] = value


def run_config(spec: StudySpec, method: Method, seed: int, *, train_file: str, test_file: str,
               num_test: int, cache_dir: str):
    """The method's named config with the study's overrides, shared data and cache, and ``seed``."""
    c = configs.get(method.config)
    stages = [dict(s) for s in c.train.stages]
    for dotted, value in spec.overrides.items():
        _set(c, dotted, value)
    if c.step.k > 1:
        c.step.k = spec.k
    if stages:  # keep each stage's share of the steps when the study changes train.steps
        total, old = c.train.steps, sum(s["steps"] for s in stages)
        edges = [round(total * sum(s["steps"] for s in stages[:i + 1]) / old) for i in range(len(stages))]
        for i, s in enumerate(stages):
            s["steps"] = edges[i] - (edges[i - 1] if i else 0)
            if s.get("step", {}).get("k", 1) > 1:  # the Pass@k stage follows the study's k
                s["step"] = {**s["step"], "k": spec.k}
        c.train.stages = tuple(stages)
    c.seed = seed
    c.sft.seed = SFT_SEED  # one warm start (SFT data order and cache key) shared by every method and seed
    c.task.options.train_files = train_file
    c.task.options.test_files = test_file
    c.task.num_train = spec.num_train
    c.eval.num_prompts = num_test
    c.sft.cache_dir = cache_dir
    return c



# ------------------------------------------------------------------------------------------------ run
def run(spec: StudySpec, runs_dir: str, *, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Train every (method, seed) of ``spec`` under ``runs_dir``; returns one record per run."""
    from passk_jax.rl import trainer
    from passk_jax.spec import RunSpec

    train_file, test_file, num_test = write_data(spec, os.path.join(runs_dir, "data"))
    cache_dir = os.path.join(runs_dir, "sft_cache")
    out = []
    for seed in range(spec.seeds):  # seed 0 first: its first run builds the shared warm start
        for key in spec.methods:
            method = METHOD_BY_KEY[key]
            workdir = os.path.join(runs_dir, key, f"seed{seed}")
            done = os.path.exists(os.path.join(workdir, "eval_final.json"))
            t0 = time.time()
            if not done:
                log(f"[study] {method.label} seed {seed} -> {workdir}")
                config = run_config(spec, method, seed, train_file=train_file, test_file=test_file,
                                    num_test=num_test, cache_dir=cache_dir)
                summary = trainer.train(RunSpec.from_config(config), workdir)
                if summary.get("status") != "done":
                    raise RuntimeError(f"run {workdir} ended with status {summary.get('status')!r}.")
                log(f"[study] {method.label} seed {seed} done in {time.time() - t0:.0f} s")
            out.append(load_run(workdir, method, seed))
    return out


def load_run(workdir: str, method: Method, seed: int) -> dict[str, Any]:
    """The evaluations and training curves a finished run left in ``workdir``."""
    with open(os.path.join(workdir, "eval_initial.json")) as f:
        initial = json.load(f)
    with open(os.path.join(workdir, "eval_final.json")) as f:
        final = json.load(f)
    records = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    curves = {name: [(r["step"], r[name]) for r in records if name in r and "rollout/reward_mean" in r]
              for name in ("step/entropy", "rollout/reward_mean", "step/rollout_pass@k")}
    sft_cached = next((r.get("sft/cached", 0.0) for r in records if r["step"] == 0 and
                       ("sft/cached" in r or "sft/final_loss" in r)), None)
    return dict(method=method.key, label=method.label, seed=seed, workdir=workdir, initial=initial,
                final=final, curves=curves, sft_cached=sft_cached)


def check_shared_warm_start(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Evidence that every run started from the same params: at most one run trained the SFT (all others
    reused the cache), and within a seed every method's initial evaluation is identical (same params, same
    eval samples)."""
    trained = [r["workdir"] for r in runs if r["sft_cached"] is not None and r["sft_cached"] < 1.0]
    identical = True
    for seed in {r["seed"] for r in runs}:
        firsts = [r["initial"] for r in runs if r["seed"] == seed]
        identical &= all(f == firsts[0] for f in firsts)
    return dict(sft_trained_in=trained, ok=len(trained) <= 1 and identical,
                initial_eval_identical_within_seed=identical)


# ------------------------------------------------------------------------------------------ aggregate
def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error over seeds (NaN SE for a single seed)."""
    v = np.asarray(values, np.float64)
    return float(v.mean()), (float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else float("nan"))


_SOURCE_KEY = re.compile(r"^eval/(.+)/pass@(\d+)$")


def eval_ks(ev: dict[str, float]) -> list[int]:
    return sorted(int(m.group(1)) for key in ev if (m := re.match(r"^eval/pass@(\d+)$", key)))


def eval_sources(ev: dict[str, float]) -> list[str]:
    return sorted({m.group(1) for key in ev if (m := _SOURCE_KEY.match(key))},
                  key=lambda s: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)])


def final_entropy(run: dict[str, Any], tail: int = 3) -> float:
    """Mean policy entropy of the last ``tail`` RL steps (nats per token)."""
    pts = run["curves"]["step/entropy"]
    return float(np.mean([v for _, v in pts[-tail:]])) if pts else float("nan")


def aggregate(spec: StudySpec, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per method (and the warm start): mean and SE over seeds of every reported quantity."""
    first = runs[0]["final"]
    ks, sources = eval_ks(first), eval_sources(first)
    metric_keys = [f"eval/pass@{k}" for k in ks] + [f"eval/{s}/pass@{k}" for s in sources for k in ks]
    metric_keys += [k for k in ("eval/greedy_accuracy", "eval/distinct_wrong_per_prompt", "eval/length_mean")
                    if k in first]
    rows = []

    def row(key: str, label: str, evals: list[dict[str, float]], entropies: list[float]) -> dict[str, Any]:
        stats = {m: mean_se([e[m] for e in evals]) for m in metric_keys}
        stats["entropy_final"] = mean_se(entropies) if entropies else (float("nan"), float("nan"))
        return dict(method=key, label=label, seeds=len(evals), stats=stats)

    # The warm start: one initial evaluation per seed (identical across methods of a seed).
    by_seed = {}
    for r in runs:
        by_seed.setdefault(r["seed"], r)
    first_entropy = [r["curves"]["step/entropy"][0][1] for r in by_seed.values() if r["curves"]["step/entropy"]]
    rows.append(row("warm_start", "warm start (SFT, before RL)", [r["initial"] for r in by_seed.values()],
                    first_entropy))
    for key in spec.methods:
        mine = [r for r in runs if r["method"] == key]
        if mine:
            rows.append(row(key, METHOD_BY_KEY[key].label, [r["final"] for r in mine],
                            [final_entropy(r) for r in mine]))
    curves = {}
    for key in spec.methods:
        mine = [r for r in runs if r["method"] == key]
        for name in ("step/entropy", "rollout/reward_mean"):
            series = [dict(r["curves"][name]) for r in mine]
            steps = sorted(set.intersection(*(set(s) for s in series))) if series else []
            curves.setdefault(name, {})[key] = dict(
                steps=steps, mean=[float(np.mean([s[t] for s in series])) for t in steps],
                se=[mean_se([s[t] for s in series])[1] for t in steps])
    return dict(spec=dataclasses.asdict(spec), ks=ks, sources=sources, rows=rows, curves=curves,
                warm_start=check_shared_warm_start(runs),
                runs=[dict(method=r["method"], seed=r["seed"], workdir=r["workdir"]) for r in runs])


def write_outputs(study: dict[str, Any], out_dir: str) -> None:
    """study.json, study_table.csv and the study figures."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "study.json"), "w") as f:
        json.dump(study, f, indent=1)
    keys = list(study["rows"][0]["stats"])
    with open(os.path.join(out_dir, "study_table.csv"), "w") as f:
        f.write("method,seeds," + ",".join(f"{k},{k}_se" for k in keys) + "\n")
        for r in study["rows"]:
            vals = ",".join(f"{r['stats'][k][0]:.6g},{r['stats'][k][1]:.6g}" for k in keys)
            f.write(f"{r['method']},{r['seeds']},{vals}\n")
    _plot_pass_at_k(study, os.path.join(out_dir, "study_pass_at_k.png"))
    _plot_curves(study, os.path.join(out_dir, "study_curves.png"))


def _plot_pass_at_k(study: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks, sources = study["ks"], study["sources"]
    panels = [("", "all test mazes")] + [(f"{s}/", s) for s in sources]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, (tag, title) in zip(axes[0], panels):
        for r in study["rows"]:
            m = np.array([r["stats"][f"eval/{tag}pass@{k}"][0] for k in ks])
            se = np.nan_to_num(np.array([r["stats"][f"eval/{tag}pass@{k}"][1] for k in ks]))
            style = dict(color="k", ls="--") if r["method"] == "warm_start" else {}
            ax.errorbar(ks, m, yerr=se, marker="o", ms=3, capsize=2, label=r["label"], **style)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("k")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("held-out pass@k (unbiased)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _plot_curves(study: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = {"step/entropy": "policy entropy (nats/token)", "rollout/reward_mean": "rollout reward (pass@1)"}
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, (name, title) in zip(axes, titles.items()):
        for key, c in study["curves"].get(name, {}).items():
            if not c["steps"]:
                continue
            m, se = np.array(c["mean"]), np.nan_to_num(np.array(c["se"]))
            line, = ax.plot(c["steps"], m, label=METHOD_BY_KEY[key].label, lw=1.4)
            ax.fill_between(c["steps"], m - se, m + se, color=line.get_color(), alpha=0.15)
        ax.set_xlabel("RL step")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
