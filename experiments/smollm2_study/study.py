"""The SmolLM2 study: Pass@1 vs Pass@k (analytical) training of SmolLM2-135M-Instruct, paired by seed.

The design is pre-registered in ``DESIGN.md`` (its numbers are the ``DESIGN`` constants below; any change
changes the fingerprint and starts a new design). It reuses the reproduction package's machinery: records
(``experiments.reproduce.study.make_record``: per-prompt evaluation results at every evaluation point,
training curves, wall time, commit, machine), claims and intervals (``experiments.reproduce.claims`` /
``stats``: seed t-interval and prompt bootstrap; the "mazes" there are the held-out prompts here).

* Data: written once to verl-schema JSONL (the gym generator at data seed 0) and passed to every run, so
  every method and seed trains on the same pool and is evaluated on the same held-out prompts.
* All runs start from the same pretrained weights (no warm start). Seed s sets the RL randomness and the
  evaluation key, shared by both methods of a seed (a paired design with common random numbers).
* A finished run leaves ``results/<design>/<method>/seed<s>.json``; rerunning skips recorded runs and
  resumes interrupted ones from their checkpoints under ``--runs``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Callable

import numpy as np

from experiments import configs
from experiments.reproduce import claims, stats
from experiments.reproduce import study as repro

HERE = os.path.dirname(os.path.abspath(__file__))
RECORDS = os.path.join(HERE, "results")
DATA_SEED = 0
# How long one answer may take to verify. An execution setting, not part of the design: the runs share a
# 2-core box with other work at nice 19, and a starved verifier must not turn an answer into a timeout
# (scored 0); records count the verifier failures that happened anyway (``verifier_failures``).
VERIFIER_TIMEOUT_S = 600.0
METHODS = {"pass1": {"step.estimator": "grpo", "step.k": 1}, "passk_analytic": {"step.estimator": "passk_analytic"}}


@dataclasses.dataclass(frozen=True)
class Design:
    """Everything that defines the study; ``overrides`` are dotted config fields over ``smollm2_arith``."""

    name: str
    methods: tuple[str, ...]
    seeds: int
    num_train: int
    num_test: int
    k: int
    overrides: dict[str, Any]

    @property
    def steps(self) -> int:
        return int(self.overrides["train.steps"])

    def fingerprint(self) -> str:
        keep = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("methods", "seeds")}
        return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


_COMMON = {"train.export_hf": False, "train.log_every": 5, "train.keep_checkpoints": 1, "train.eval_every": 0,
           "train.samples_prompts": 4, "eval.greedy": False, "eval.temperature": 1.0, "eval.top_p": 0.95}

# Pre-registered in DESIGN.md: the named config's training (4 prompts x 8 samples, 32 new tokens, top-p 0.95,
# learning rate 2e-5, 12 steps) with a larger held-out evaluation.
MAIN = Design(name="main", methods=("pass1", "passk_analytic"), seeds=3, num_train=2000, num_test=256, k=4,
              overrides={**_COMMON, "rollout.prompts_per_step": 4, "rollout.num_samples": 8,
                         "rollout.max_new_tokens": 32, "rollout.top_p": 0.95, "rollout.decode_slots": 32,
                         "step.old_logprobs": "recompute",
                         "step.learning_rate": 2e-5, "step.warmup_steps": 2, "train.steps": 12,
                         "train.checkpoint_every": 4, "eval.num_samples": 8, "eval.sample_prompts": 32})
# Smoke test of the pipeline (tests); the numbers mean nothing.
QUICK = Design(name="quick", methods=("pass1", "passk_analytic"), seeds=1, num_train=8, num_test=2, k=2,
               overrides={**_COMMON, "rollout.prompts_per_step": 2, "rollout.num_samples": 2,
                          "rollout.max_new_tokens": 6, "rollout.decode_slots": 4, "step.learning_rate": 2e-6,
                          "step.warmup_steps": 0, "train.steps": 1, "train.checkpoint_every": 1,
                          "eval.num_samples": 2, "eval.sample_prompts": 2, "model.scan_layers": True})
DESIGNS = {d.name: d for d in (MAIN, QUICK)}

# The claims, judged at the end of training (DESIGN.md): superiority of a over b, or non-inferiority.
CLAIMS = (
    claims.Claim("explore", "Pass@k training reaches a higher held-out pass@8 than Pass@1 training",
                 "Table 7 (maze): pass@k up under Pass@k training", "passk_analytic", "pass1", claims.Metric("pass@8")),
    claims.Claim("no_cost", "Pass@k training does not cost pass@1 (non-inferior within 2 points)",
                 "Table 7", "passk_analytic", "pass1", claims.Metric("pass@1"), "noninferiority", 0.02),
)
RISES = ("pass@8", "pass@1")  # within-method change from step 0 to the end, per method (descriptive + verdicts)


def _set(config, dotted: str, value: Any) -> None:
    node = config
    *path, leaf = dotted.split(".")
    for part in path:
        node = node[part]
    node[leaf] = value


def write_data(design: Design, data_dir: str, model_path: str) -> tuple[str, str, list[str]]:
    """The shared train / held-out pools as verl JSONL; returns (train path, test path, test sources)."""
    from passk_jax.run.data import make_task
    from passk_jax.run.spec import RunSpec
    from passk_jax.tasks.verl_data import write_verl

    c = configs.get("smollm2_arith")
    c.model.hf_path = model_path
    c.task.options.test_size = design.num_test
    task = make_task(RunSpec.from_config(c, host_checks=False).task)
    test = task.examples("test", design.num_test, DATA_SEED)
    train = task.examples("train", design.num_train, DATA_SEED)
    os.makedirs(data_dir, exist_ok=True)
    paths = os.path.join(data_dir, "train.jsonl"), os.path.join(data_dir, "test.jsonl")
    for examples, path in zip((train, test), paths):
        write_verl(examples, path)
    return paths[0], paths[1], [ex.data_source for ex in test]


def run_config(design: Design, method: str, seed: int, *, train_file: str, test_file: str, model_path: str):
    c = configs.get("smollm2_arith")
    for dotted, value in {**design.overrides, **METHODS[method]}.items():
        _set(c, dotted, value)
    if c.step.k > 1:
        c.step.k = design.k
    c.seed = seed
    c.model.hf_path = model_path
    c.task.verifier_timeout_s = VERIFIER_TIMEOUT_S
    c.task.options.train_files = train_file
    c.task.options.test_files = test_file
    c.task.options.test_size = design.num_test
    c.task.num_train = design.num_train
    c.eval.num_prompts = design.num_test
    return c


record_path = repro.record_path  # records_dir/<design>/<method>/seed<s>.json, as the reproduction's
load_records = repro.load_records  # every record of the design's methods and seeds that exists (fingerprint checked)


def run(design: Design, runs_dir: str, model_path: str, *, records_dir: str = RECORDS,
        log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Train every (seed, method) without a record, seed by seed; returns the records."""
    from passk_jax.run import trainer

    if not os.path.isfile(os.path.join(model_path, "config.json")):
        raise FileNotFoundError(f"no converted model in {model_path}; run `make smollm2` first.")
    root = os.path.join(runs_dir, design.name)
    train_file, test_file, sources = write_data(design, os.path.join(root, "data"), model_path)
    os.makedirs(os.path.join(records_dir, design.name), exist_ok=True)
    with open(os.path.join(records_dir, design.name, "design.json"), "w") as f:
        json.dump(dict(spec=dataclasses.asdict(design), fingerprint=design.fingerprint(), sources=sources), f,
                  indent=1)
    commit = repro._commit()
    for seed in range(design.seeds):
        for method in design.methods:
            path = record_path(design, method, seed, records_dir)
            if os.path.exists(path):
                continue
            workdir = os.path.join(root, method, f"seed{seed}")
            log(f"[smollm2 study] {design.name}: {method}, seed {seed} -> {workdir}")
            config = run_config(design, method, seed, train_file=train_file, test_file=test_file,
                                model_path=model_path)
            summary, wall_s = repro._timed_train(trainer, config, workdir)
            if summary.get("status") != "done":
                raise RuntimeError(f"run {workdir} ended with status {summary.get('status')!r}.")
            record = repro.make_record(design, method, seed, workdir, wall_s, commit)
            repro.write_record(path, record)
            log(f"[smollm2 study] {method}, seed {seed}: done in {record['wall_s']:.0f} s")
    return load_records(design, records_dir)


def rise(records: list[dict[str, Any]], method: str, metric: claims.Metric, sources: list[str],
         draws: int = 2000) -> dict[str, Any] | None:
    """The change of ``metric`` from step 0 to the end within ``method``, per seed, with the seed interval,
    the prompt bootstrap and the verdict of "it rises"."""
    recs = sorted((r for r in records if r["method"] == method), key=lambda r: r["seed"])
    if not recs:
        return None
    m = metric.resolve(recs[0]["num_samples"], sources)
    end = recs[0]["steps"]
    after = np.stack([m.per_maze(r, end, sources) for r in recs])
    before = np.stack([m.per_maze(r, 0, sources) for r in recs])
    seed_ci = stats.t_interval(list((after - before).mean(1)))
    prompt_ci = stats.maze_bootstrap(after, before, draws=draws)
    return dict(method=method, metric=m, seeds=[r["seed"] for r in recs], before=before.mean(1).tolist(),
                after=after.mean(1).tolist(), seed_ci=seed_ci, prompt_ci=prompt_ci,
                verdict=stats.verdict(seed_ci, prompt_ci))
