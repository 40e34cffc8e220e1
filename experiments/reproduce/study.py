"""The training study: Pass@k Training variants against Pass@1 training, paired by seed.

Design (the numbers of each design are the ``StudySpec`` constants below; the main design and its verdict
rule are pre-registered in ``DESIGN.md``):
* Data are written once to verl-schema JSONL files (maze generator, data seed 0) and passed to every run
  through ``task.options.train_files/test_files``: every method and seed trains on the same problem pool
  and is evaluated on the same held-out mazes.
* **Each seed has its own warm start**: ``config.seed = s`` seeds the model init, the SFT data order
  (``sft.seed = -1``: the run's seed) and the RL randomness, so seed variance includes the warm start.
  Within a seed every method starts from that seed's warm start (built by the seed's first run, reused
  from the study's SFT cache by the others) and is evaluated with the same evaluation key at the same
  steps (a paired design: common random numbers across methods).
* A finished run is reduced to a small **record** (``results/study/<design>/<method>/seed<s>.json``:
  per-maze evaluation results at every evaluation point, the training curves, wall time, commit), which
  is all the report needs; records are committed, so the report regenerates without rerunning anything
  and the study resumes across machines: a run with a record is skipped, an interrupted one resumes from
  its checkpoints under ``--runs``.
* The warm start of a seed is fingerprinted by its step-0 evaluation (same params and same evaluation key
  give the same per-maze results); the report refuses to pair runs of a seed whose fingerprints differ.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import shutil
import subprocess
import time
from typing import Any, Callable, Sequence

from experiments import configs
from passk_jax.run.metric_log import read_jsonl

DATA_SEED = 0
HERE = os.path.dirname(os.path.abspath(__file__))
RECORDS = os.path.join(HERE, "results", "study")


@dataclasses.dataclass(frozen=True)
class Method:
    key: str               # directory name
    label: str             # row label of the report
    config: str            # named config in experiments/configs
    k: int | None = None   # k of its Pass@k estimator (None: the design's k)
    lr_scale: float = 1.0  # its learning rate is the design's times this


METHODS: tuple[Method, ...] = (
    Method("pass1", "Pass@1", "pass1"),
    Method("passk_full", "Pass@k, full sampling", "passk_full"),
    Method("passk_bootstrap", "Pass@k, bootstrap", "passk_bootstrap"),
    Method("passk_analytic", "Pass@k, analytical", "passk_k4"),
    Method("passk_then_pass1", "Pass@k -> Pass@1", "passk_then_pass1"),
    Method("passk_combination", "Pass@k, combination", "passk_combination"),
    Method("passk_adaptive", "Pass@k, entropy-adaptive", "passk_adaptive"),
    Method("passk8_lr2", "Pass@k (k = 8, 2× lr)", "passk_k4", k=8, lr_scale=2.0),
)
METHOD_BY_KEY = {m.key: m for m in METHODS}


def staged(method: str) -> bool:
    """Whether the method's named config trains in sequential stages (Pass@k -> Pass@1)."""
    return bool(configs.get(METHOD_BY_KEY[method].config).train.stages)


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
    eval_points: int               # evaluations per run, evenly spaced, including step 0 and the end
    overrides: dict[str, Any]
    # The steps of each stage of a staged method (Pass@k -> Pass@1), summing to train.steps; () keeps the
    # named config's proportions.
    stage_steps: tuple[int, ...] = ()

    @property
    def steps(self) -> int:
        return int(self.overrides["train.steps"])

    @property
    def eval_every(self) -> int:
        if self.steps % (self.eval_points - 1):
            raise ValueError(f"{self.eval_points} evaluation points need train.steps divisible by "
                             f"{self.eval_points - 1}, got {self.steps}.")
        return self.steps // (self.eval_points - 1)

    def fingerprint(self) -> str:
        """A hash of everything that changes the runs' results (not the seed count or the method list)."""
        keep = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("methods", "seeds")}
        if not self.stage_steps:  # designs that predate the field keep their fingerprint
            keep.pop("stage_steps")
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


_COMMON = {"train.export_hf": False, "train.log_every": 10, "train.keep_checkpoints": 1,
           "eval.greedy": True, "eval.temperature": 1.0, "eval.top_p": 0.95,
           "sft.seed": -1, "sft.num_examples": 2000, "sft.batch_size": 64}

# The main design (pre-registered in DESIGN.md with the pilot that chose it).
MAIN = StudySpec(
    name="main", methods=("pass1", "passk_analytic", "passk_bootstrap", "passk_full", "passk_then_pass1"),
    seeds=5, train_sizes=(5, 7), test_sizes=(5, 7, 9), num_train=4000, test_per_size=256, k=4,
    eval_points=4,
    overrides={**_COMMON,
               "rollout.prompts_per_step": 16, "rollout.num_samples": 16, "rollout.max_new_tokens": 48,
               "step.learning_rate": 2e-4, "train.steps": 120, "train.checkpoint_every": 20,
               "eval.num_samples": 32, "sft.steps": 300})

# The pilot: Pass@1 training only, a smaller evaluation, the same training setup at several learning rates
# (``--pilot --lr``), to see where Pass@1 training plateaus within the budget.
PILOT = dataclasses.replace(
    MAIN, name="pilot", methods=("pass1",), seeds=1, test_per_size=64, eval_points=6,
    overrides={**MAIN.overrides, "train.steps": 150, "train.checkpoint_every": 30})

# Quick mode: a smoke test of the whole pipeline (CI); the numbers are meaningless.
QUICK = StudySpec(
    name="quick", methods=("pass1", "passk_analytic", "passk_then_pass1"), seeds=2,
    train_sizes=(5,), test_sizes=(5, 7), num_train=64, test_per_size=4, k=2, eval_points=3,
    overrides={**_COMMON,
               "rollout.prompts_per_step": 4, "rollout.num_samples": 4, "rollout.max_new_tokens": 12,
               "rollout.decode_slots": 8, "step.warmup_steps": 0, "step.learning_rate": 1e-4, "train.steps": 2,
               "train.checkpoint_every": 2, "eval.num_samples": 4, "eval.greedy": True,
               "sft.steps": 2, "sft.num_examples": 16, "sft.batch_size": 8})

# The training setup of the second design and its pilot (N = 32, 300 steps from a 300-step warm start).
_N32 = {**_COMMON, "rollout.prompts_per_step": 16, "rollout.num_samples": 32, "rollout.max_new_tokens": 48,
        "step.learning_rate": 2e-4, "train.steps": 300, "train.checkpoint_every": 50, "eval.num_samples": 32,
        "sft.steps": 300}

# The second design's pilot, part 2 (DESIGN.md, "Second design"): Pass@1 training alone at N = 32 on 5×5 mazes
# from a 300-step SFT warm start (part 1 chose the distribution), long enough to see where its held-out
# pass@1 stops rising, and what a step costs with the current update.
PILOT2 = StudySpec(
    name="pilot2", methods=("pass1",), seeds=1, train_sizes=(5,), test_sizes=(5, 7, 9), num_train=4000,
    test_per_size=128, k=4, eval_points=7,
    overrides=_N32)

# The second design (pre-registered in DESIGN.md after both pilot parts): 5×5 training, N = 32, Pass@k (k = 4)
# for 200 steps then Pass@1 for 100 (its step 200 is the Pass@k arm), Pass@1 for 300, and a k = 8 arm at
# twice the learning rate; ten seeds.
SECOND = StudySpec(
    name="second", methods=("pass1", "passk_then_pass1", "passk8_lr2"), seeds=10, train_sizes=(5,),
    test_sizes=(5, 7, 9), num_train=4000, test_per_size=256, k=4, eval_points=7, stage_steps=(200, 100),
    overrides=_N32)

DESIGNS = {s.name: s for s in (MAIN, PILOT, PILOT2, SECOND, QUICK)}


def make_spec(design: str = "main", seeds: int | None = None, methods: Sequence[str] | None = None,
              steps: int | None = None, learning_rate: float | None = None) -> StudySpec:
    """A named design with optional overrides of the seeds, the methods, the RL steps and the learning rate
    (a changed step count or learning rate is another design: its records live apart)."""
    if design not in DESIGNS:
        raise ValueError(f"unknown study design {design!r}; choose from {', '.join(DESIGNS)}.")
    spec = DESIGNS[design]
    if methods:
        unknown = [m for m in methods if m not in METHOD_BY_KEY]
        if unknown:
            raise ValueError(f"unknown method {unknown[0]!r}; choose from {', '.join(METHOD_BY_KEY)}.")
        spec = dataclasses.replace(spec, methods=tuple(methods))
    if seeds is not None:
        if seeds < 1:
            raise ValueError(f"--seeds must be >= 1, got {seeds}.")
        spec = dataclasses.replace(spec, seeds=seeds)
    renamed = spec.name
    if steps is not None:
        if steps < 1:
            raise ValueError(f"--steps must be >= 1, got {steps}.")
        split = spec.stage_steps
        if split:  # the same shares of the new step count
            edges = [round(steps * sum(split[:i + 1]) / sum(split)) for i in range(len(split))]
            split = tuple(e - (edges[i - 1] if i else 0) for i, e in enumerate(edges))
        spec = dataclasses.replace(spec, overrides={**spec.overrides, "train.steps": steps}, stage_steps=split)
        renamed += f"_steps{steps}"
    if learning_rate is not None:
        if not learning_rate > 0:
            raise ValueError(f"--lr must be > 0, got {learning_rate}.")
        spec = dataclasses.replace(spec, overrides={**spec.overrides, "step.learning_rate": learning_rate})
        renamed += f"_lr{learning_rate:g}"
    spec = dataclasses.replace(spec, name=renamed)
    spec.eval_every  # noqa: B018 - validates the evaluation points against the steps
    return spec


# ----------------------------------------------------------------------------------------------- data
def write_data(spec: StudySpec, data_dir: str) -> tuple[str, str, list[str]]:
    """Write the shared train/test pools (JSONL, verl schema); returns (train path, test path, the test
    mazes' data sources in order)."""
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
    return paths[0], paths[1], [ex.data_source for ex in test]


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
    k = method.k or spec.k
    if c.step.k > 1:
        c.step.k = k
    c.step.learning_rate = c.step.learning_rate * method.lr_scale
    if stages:  # the design's stage split, or each stage's share of the steps when the study changes them
        total, old = c.train.steps, sum(s["steps"] for s in stages)
        if spec.stage_steps:
            if len(spec.stage_steps) != len(stages) or sum(spec.stage_steps) != total:
                raise ValueError(f"design {spec.name!r}: stage_steps {spec.stage_steps} must give each of the "
                                 f"{len(stages)} stages of {method.config!r} its steps, summing to {total}.")
            edges = [sum(spec.stage_steps[:i + 1]) for i in range(len(stages))]
        else:
            edges = [round(total * sum(s["steps"] for s in stages[:i + 1]) / old) for i in range(len(stages))]
        for i, s in enumerate(stages):
            s["steps"] = edges[i] - (edges[i - 1] if i else 0)
            if s.get("step", {}).get("k", 1) > 1:  # the Pass@k stage follows the study's k
                s["step"] = {**s["step"], "k": k}
        c.train.stages = tuple(stages)
    c.seed = seed
    c.train.eval_every = spec.eval_every
    c.task.options.train_files = train_file
    c.task.options.test_files = test_file
    c.task.num_train = spec.num_train
    c.eval.num_prompts = num_test
    c.eval.sample_prompts = min(num_test, 256)
    c.sft.cache_dir = cache_dir
    return c


# ---------------------------------------------------------------------------------------------- records
def record_path(spec: StudySpec, method: str, seed: int, records_dir: str = RECORDS) -> str:
    return os.path.join(records_dir, spec.name, method, f"seed{seed}.json")


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def fingerprint(evaluation: dict[str, Any], curves: dict[str, list]) -> str:
    """A hash of what a run's warm start alone determines: the step-0 evaluation's per-maze results and the
    first RL step's rollout reward and length (same params, same keys -> the same samples)."""
    keys = ("correct", "greedy", "distinct_wrong", "distinct")
    first = {name: curves[name][0] if curves.get(name) else None for name in ("reward", "length")}
    blob = json.dumps({**{k: evaluation.get(k) for k in keys}, **first}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def make_record(spec: StudySpec, method: str, seed: int, workdir: str, wall_s: float,
                commit: str | None = None) -> dict[str, Any]:
    """The record of a finished run: everything the report reads, no machine paths."""
    evals = {}
    details = os.path.join(workdir, "eval_details")
    for name in sorted(os.listdir(details)):
        with open(os.path.join(details, name)) as f:
            d = json.load(f)
        evals[str(d.pop("step"))] = d
    sources = next(iter(evals.values()))["data_source"]
    for d in evals.values():
        if d.pop("data_source") != sources:
            raise ValueError(f"run {workdir}: evaluations disagree on the held-out mazes.")
    records = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    curves = {short: [[r["step"], r[name]] for r in records if name in r and "rollout/reward_mean" in r]
              for short, name in (("entropy", "step/entropy"), ("reward", "rollout/reward_mean"),
                                  ("length", "rollout/length_mean"))}
    failures = {}  # verifier calls that timed out or raised (scored 0), summed over the run's steps
    for r in records:
        for name, value in r.items():
            parts = name.split("/")
            if len(parts) == 3 and parts[0] == "verifier" and parts[2] in ("timeouts", "errors"):
                failures[f"{parts[1]}/{parts[2]}"] = failures.get(f"{parts[1]}/{parts[2]}", 0) + int(value)
    return dict(design=spec.name, design_fingerprint=spec.fingerprint(), method=method, seed=seed,
                num_samples=int(spec.overrides["eval.num_samples"]), steps=spec.steps,
                sources_sha=hashlib.sha256(json.dumps(sources).encode()).hexdigest()[:16],
                warm_start=fingerprint(evals["0"], curves), evals=evals, curves=curves, wall_s=round(wall_s, 1),
                commit=commit or _commit(), machine=_machine(), verifier_failures=failures)


def write_record(path: str, record: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, separators=(",", ":"))
    os.replace(tmp, path)


def load_records(spec: StudySpec, records_dir: str = RECORDS) -> list[dict[str, Any]]:
    """Every record of ``spec``'s methods and seeds that exists (a partial study is fine)."""
    out = []
    for seed in range(spec.seeds):
        for method in spec.methods:
            path = record_path(spec, method, seed, records_dir)
            if os.path.exists(path):
                with open(path) as f:
                    r = json.load(f)
                if r["design_fingerprint"] != spec.fingerprint():
                    raise ValueError(f"{path} was made by another version of design {spec.name!r} "
                                     "(fingerprint differs); move it aside or rerun.")
                out.append(r)
    return out


def load_superseded(spec: StudySpec, records_dir: str = RECORDS) -> list[dict[str, Any]]:
    """The records moved to ``<design>/superseded/`` (runs from a warm start that a later machine rebuilt
    differently): not in the analysis, but their CPU time is part of what the study took."""
    root = os.path.join(records_dir, spec.name, "superseded")
    out = []
    for dirpath, _, files in os.walk(root):
        for name in sorted(files):
            if name.endswith(".json"):
                with open(os.path.join(dirpath, name)) as f:
                    out.append(json.load(f))
    return out


def write_manifest(spec: StudySpec, sources: list[str], records_dir: str = RECORDS) -> None:
    """``<design>/design.json``: the spec and the held-out mazes' data sources, in evaluation order."""
    path = os.path.join(records_dir, spec.name, "design.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(dict(spec=dataclasses.asdict(spec), fingerprint=spec.fingerprint(), sources=sources), f,
                  indent=1)


def load_manifest(design: str, records_dir: str = RECORDS) -> dict[str, Any] | None:
    path = os.path.join(records_dir, design, "design.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


# ------------------------------------------------------------------------------------------------ run
def _machine() -> str:
    """The CPU as a record names it: model, family and model number where Linux says them (floating point
    differs between CPU models)."""
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = info.get("model name") or platform.processor() or "unknown CPU"
    if "cpu family" in info:
        name += f" (family {info['cpu family']}, model {info.get('model', '?')})"
    return f"{name}, {platform.machine()}, {os.cpu_count()} cpus"


def _supersede(spec: StudySpec, seed: int, record: dict[str, Any], records_dir: str, root: str,
               log: Callable[[str], None]) -> list[str]:
    """Records of ``seed`` made from another warm start than ``record`` (the seed's warm start was rebuilt
    on a machine whose floating point differs) move to ``<design>/superseded/``; returns their methods,
    which must run again to stay paired."""
    moved = []
    for method in spec.methods:
        path = record_path(spec, method, seed, records_dir)
        if method == record["method"] or not os.path.exists(path):
            continue
        with open(path) as f:
            other = json.load(f)
        if other["warm_start"] != record["warm_start"]:
            dest = os.path.join(records_dir, spec.name, "superseded", method, f"seed{seed}.json")
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            os.replace(path, dest)
            shutil.rmtree(os.path.join(root, method, f"seed{seed}"), ignore_errors=True)
            log(f"[study] seed {seed}: the warm start rebuilt here differs from the one {method} was trained "
                f"from (machine {other['machine']}, commit {other['commit']}); its record moved to {dest} and "
                "it runs again.")
            moved.append(method)
    return moved


class Stopped(RuntimeError):
    """A run of the study was stopped by a signal (SIGTERM / preemption) after checkpointing."""


def _timed_train(trainer, config, workdir: str) -> tuple[dict[str, Any], float]:
    """``trainer.train`` and the run's wall time summed over every invocation (``study_wall_s`` in the
    workdir carries it across interruptions)."""
    from passk_jax.run.spec import RunSpec

    path = os.path.join(workdir, "study_wall_s")
    before = float(open(path).read()) if os.path.exists(path) else 0.0
    t0 = time.time()
    try:
        return trainer.train(RunSpec.from_config(config), workdir), before + time.time() - t0
    finally:
        if os.path.isdir(workdir):
            with open(path, "w") as f:
                f.write(f"{before + time.time() - t0:.1f}")


def run(spec: StudySpec, runs_dir: str, *, records_dir: str = RECORDS,
        log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Train every (seed, method) of ``spec`` that has no record yet, seed by seed (a seed's first run
    builds its warm start); returns every record."""
    from passk_jax.run import trainer

    root = os.path.join(runs_dir, spec.name)
    train_file, test_file, sources = write_data(spec, os.path.join(root, "data"))
    write_manifest(spec, sources, records_dir)
    cache_dir = os.path.join(root, "sft_cache")
    commit = _commit()  # the code the runs of this invocation use
    for seed in range(spec.seeds):
        pending = [m for m in spec.methods if not os.path.exists(record_path(spec, m, seed, records_dir))]
        while pending:
            key = pending.pop(0)
            method = METHOD_BY_KEY[key]
            workdir = os.path.join(root, key, f"seed{seed}")
            log(f"[study] {spec.name}: {method.label}, seed {seed} -> {workdir}")
            config = run_config(spec, method, seed, train_file=train_file, test_file=test_file,
                                num_test=len(sources), cache_dir=cache_dir)
            summary, wall_s = _timed_train(trainer, config, workdir)
            if summary.get("status") == "preempted":
                raise Stopped(f"[study] {method.label}, seed {seed}: stopped by a signal at its newest checkpoint; "
                              "the same command resumes it.")
            if summary.get("status") != "done":
                raise RuntimeError(f"run {workdir} ended with status {summary.get('status')!r}.")
            record = make_record(spec, key, seed, workdir, wall_s, commit)
            write_record(record_path(spec, key, seed, records_dir), record)
            log(f"[study] {method.label}, seed {seed}: done in {record['wall_s']:.0f} s")
            pending += _supersede(spec, seed, record, records_dir, root, log)
    return load_records(spec, records_dir)
