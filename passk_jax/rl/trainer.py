"""The training loop: warm start, rollout, score, train step, evaluate, checkpoint, log, report, export.

``train(config, workdir)`` runs a whole experiment from an ``ml_collections`` config (see
``experiments/configs/base.py`` for every field). Starting in a workdir that has checkpoints resumes from
the newest readable one; resuming is exact (bit-identical on CPU) because every random draw is derived from
(seed, step) and the data order from (seed, position), and both are saved. SIGTERM / SIGINT save a
checkpoint and stop cleanly (preemption).

Multi-process runs (``parallel.initialize_distributed``) are one multi-controller job: every process runs
this same loop and the same compiled programs over the global mesh; each scores only its own rollout rows
(``rollout.generate``); host-side decisions (stop, resume, cache hits) and metrics (timings: max over
processes, verifier counters: sum) are agreed across processes; only process 0 writes config.json,
metrics.jsonl / TensorBoard, eval_*.json, report.md and the tokenizer; checkpoints and the Hugging Face
export are written by all processes together (Orbax / ``hf.save_pretrained`` coordinate the files).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from typing import Any, Sequence

import jax
import numpy as np
from ml_collections import ConfigDict
from tqdm import tqdm

from passk_jax import advantages, parallel, report, sft
from passk_jax import workdir as workdir_lib
from passk_jax.checkpoint import Checkpointer, PreemptionGuard
from passk_jax.metric_log import MetricWriter, console_line
from passk_jax.models import hf
from passk_jax.models.transformer import ATTENTION_KERNELS, ModelConfig, init as init_model
from passk_jax.rl import evaluation, rollout
from passk_jax.rl.step import StepConfig, TrainState, make_train_step, validate_batch
from passk_jax.sampling import DECODE_LAYOUTS, Sampler
from passk_jax.tasks import get as get_task, reward_spec
from passk_jax.tasks.pool import VerifierPool
from passk_jax.tasks.tokenizer import build_char_tokenizer, load_tokenizer

log = logging.getLogger("passk_jax")

CONSOLE_KEYS = {"rollout/reward_mean": "reward", "step/rollout_pass@k": "pass@k", "step/entropy": "entropy",
                "step/clip_high_frac": "clip_hi", "rollout/length_mean": "len", "perf/tokens_per_s": "tok/s",
                "time/sample": "t_sample", "time/score": "t_score", "time/update": "t_update"}


# --------------------------------------------------------------------------------------------- config
def stages(config: ConfigDict) -> list[tuple[int, StepConfig]]:
    """[(number of steps, StepConfig)] per stage; a config without stages is one stage of train.steps."""
    base = config.step.to_dict()
    specs = list(config.train.stages) or [{"steps": config.train.steps, "step": {}}]
    out = []
    for i, spec in enumerate(specs):
        spec = dict(spec)
        unknown = sorted(set(spec) - {"steps", "step"})
        if unknown:
            raise ValueError(f"train.stages[{i}] has unknown key(s) {unknown}; use 'steps' and 'step'.")
        merged = {**base, **dict(spec.get("step", {}))}
        if "estimator_options" in merged:
            merged["estimator_options"] = dict(merged["estimator_options"])
        out.append((int(spec["steps"]), StepConfig.from_dict(merged)))
    return out


def validate(config: ConfigDict) -> list[tuple[int, StepConfig]]:
    """Every check that can run before anything compiles; each failure is one sentence naming the field."""
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ValueError(msg)
    r, e = config.rollout, config.eval
    need(r.prompts_per_step >= 1, f"rollout.prompts_per_step must be >= 1, got {r.prompts_per_step}.")
    need(r.num_samples >= 1, f"rollout.num_samples must be >= 1, got {r.num_samples}.")
    need(r.max_new_tokens >= 1, f"rollout.max_new_tokens must be >= 1, got {r.max_new_tokens}.")
    need(r.sample_prompts >= 0, f"rollout.sample_prompts must be >= 0 (0 = all at once), got {r.sample_prompts}.")
    need(e.sample_prompts >= 1, f"eval.sample_prompts must be >= 1, got {e.sample_prompts}.")
    need(0 < r.top_p <= 1, f"rollout.top_p must be in (0, 1], got {r.top_p}.")
    need(r.temperature >= 0, f"rollout.temperature must be >= 0, got {r.temperature}.")
    need(r.top_k >= 0, f"rollout.top_k must be >= 0 (0 = off), got {r.top_k}.")
    call_rows = (r.sample_prompts or r.prompts_per_step) * r.num_samples
    dp = data_parallel_size(config.mesh)
    need(0 <= r.decode_slots <= call_rows,
         f"rollout.decode_slots must be in [0, {call_rows}] (0 = lockstep; at most the rows of one sampler call, "
         f"rollout.sample_prompts x rollout.num_samples), got {r.decode_slots}.")
    need(r.decode_slots % dp == 0,
         f"rollout.decode_slots={r.decode_slots} is not divisible by the data-parallel size data*fsdp={dp}.")
    need(r.decode_layout in DECODE_LAYOUTS,
         f"rollout.decode_layout must be one of {DECODE_LAYOUTS}, got {r.decode_layout!r}.")
    need(0 < e.top_p <= 1, f"eval.top_p must be in (0, 1], got {e.top_p}.")
    need(e.temperature >= 0, f"eval.temperature must be >= 0, got {e.temperature}.")
    t = config.task
    need(t.num_train is None or t.num_train >= 1, f"task.num_train must be >= 1 (or None: every row), got {t.num_train}.")
    need(t.verifier_workers >= 0, f"task.verifier_workers must be >= 0 (0 = in-process), got {t.verifier_workers}.")
    need(t.verifier_timeout_s > 0, f"task.verifier_timeout_s must be > 0, got {t.verifier_timeout_s}.")
    need(0 <= t.max_error_frac <= 1, f"task.max_error_frac must be in [0, 1], got {t.max_error_frac}.")
    need(t.max_failed_steps >= 1, f"task.max_failed_steps must be >= 1, got {t.max_failed_steps}.")
    need(config.train.log_every >= 1, f"train.log_every must be >= 1, got {config.train.log_every}.")
    need(config.train.keep_checkpoints >= 1,
         f"train.keep_checkpoints must be >= 1, got {config.train.keep_checkpoints}.")
    need(e.num_samples >= 1 and e.num_prompts >= 1, "eval.num_samples and eval.num_prompts must be >= 1.")
    need(config.train.checkpoint_every >= 1, "train.checkpoint_every must be >= 1.")
    need(str(config.model.get("scan_layers", False)).lower() in ("true", "false"),
         f"model.scan_layers must be true or false, got {config.model.get('scan_layers')!r}.")
    need(config.model.get("attention", "auto") in ATTENTION_KERNELS,
         f"model.attention must be one of {ATTENTION_KERNELS}, got {config.model.get('attention')!r}.")
    for kernel, backend in (("cudnn", "gpu"), ("splash", "tpu")):
        need(config.model.get("attention") != kernel or jax.default_backend() == backend,
             f"model.attention={kernel!r} runs only on a {backend.upper()} (this backend is "
             f"{jax.default_backend()}); use 'auto' or 'blocked'.")
    need(config.train.eval_every >= 0, "train.eval_every must be >= 0 (0 = only before and after).")
    need(config.model.hf_path or config.model.preset != "hf",
         "this config loads a Hugging Face checkpoint: set --config.model.hf_path=/path/to/model_dir.")
    need(config.model.hf_path or config.model.preset in ("tiny", "small"),
         f"model.preset must be 'tiny' or 'small' (or set model.hf_path), got {config.model.preset!r}.")
    need(not config.model.hf_path or os.path.isdir(config.model.hf_path),
         f"model.hf_path {config.model.hf_path!r} is not a directory.")
    plan = stages(config)
    need(sum(steps for steps, _ in plan) >= 0, "train.steps must be >= 0.")
    for i, (steps, cfg) in enumerate(plan):
        where = "step" if not config.train.stages else f"train.stages[{i}].step"
        need(steps >= 0, f"a stage has steps={steps}; it must be >= 0.")
        need(cfg.k <= r.num_samples, f"{where}.k={cfg.k} exceeds rollout.num_samples={r.num_samples} "
                                     "(k samples are drawn from the rollouts of a prompt).")
        if cfg.old_logprobs == "sampler" and (r.top_p < 1 or r.top_k > 0 or r.temperature != cfg.temperature):
            raise ValueError(f"{where}.old_logprobs='sampler' needs rollout.top_p=1, rollout.top_k=0 and "
                             "rollout.temperature equal to step.temperature; use old_logprobs='recompute'.")
        try:
            cfg.validate()
            validate_batch(cfg, r.prompts_per_step, r.num_samples, r.prompts_per_step * r.num_samples)
            advantages.validate(cfg.estimator, r.num_samples, cfg.k, **dict(cfg.estimator_options))
        except ValueError as err:  # the step's own messages name the field without its section
            raise ValueError(f"{where}: {err}") from None
    return plan


def data_parallel_size(mesh_config: ConfigDict) -> int:
    """data x fsdp of the configured mesh over this job's devices (a -1 size takes the rest)."""
    data, fsdp, _ = parallel.mesh_sizes(mesh_config.data, mesh_config.fsdp, mesh_config.tensor, jax.device_count())
    return data * fsdp


def make_task(config: ConfigDict):
    """The configured task (options set to "" or None count as unset); a wrong option is one clear error."""
    options = {k: v for k, v in config.task.options.to_dict().items() if v not in ("", None)}
    try:
        task = get_task(config.task.name, **options)
    except TypeError as err:
        raise ValueError(f"task.options do not fit task {config.task.name!r}: {err}.") from err
    try:
        reward_spec(task)
    except ValueError as err:
        raise ValueError(f"task {config.task.name!r}: {err}") from None
    return task


# --------------------------------------------------------------------------------------------- data
class DataStream:
    """Deterministic infinite stream over examples: position p -> a fresh permutation per epoch."""

    def __init__(self, examples: list, seed: int):
        if not examples:
            raise ValueError("the training split is empty.")
        self.examples, self.seed = examples, seed
        self._perm: tuple[int, np.ndarray] | None = None

    def take(self, position: int, count: int) -> list:
        out = []
        for p in range(position, position + count):
            epoch, i = divmod(p, len(self.examples))
            if self._perm is None or self._perm[0] != epoch:
                self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.examples)))
            out.append(self.examples[self._perm[1][i]])
        return out


# --------------------------------------------------------------------------------------------- setup
def scan_layers(config: ConfigDict) -> bool:
    """``model.scan_layers`` (default False: the unrolled stack steps faster on CPU and on an H100, and
    compiles slower; see BUILD_NOTES)."""
    return str(config.model.get("scan_layers", False)).lower() == "true"


def build_model(config: ConfigDict, mesh: jax.sharding.Mesh, workdir: str):
    """(graphdef, params, ModelConfig, tokenizer): a local HF checkpoint, or a fresh char-level model."""
    m = config.model
    if m.hf_path:
        model, cfg = hf.load_pretrained(m.hf_path, dtype=m.dtype, param_dtype=m.param_dtype, mesh=mesh,
                                        remat=m.remat, scan_layers=scan_layers(config),
                                        attention=m.get("attention", "auto"))
        from passk_jax.models.transformer import split

        graphdef, params = split(model)
        return graphdef, params, cfg, hf.load_tokenizer(m.hf_path)
    tok_dir = os.path.join(workdir, "tokenizer")
    # process 0's view decides, so no process reads the file while process 0 is writing it
    if parallel.allgather(np.bool_(os.path.exists(os.path.join(tok_dir, "tokenizer.json"))))[0]:
        tokenizer = load_tokenizer(tok_dir)
    else:
        tokenizer = build_char_tokenizer()
        if jax.process_index() == 0:
            tokenizer.save_pretrained(tok_dir)
    preset = getattr(ModelConfig, m.preset)
    cfg = preset(vocab_size=len(tokenizer), max_position_embeddings=m.max_len, dtype=m.dtype,
                 param_dtype=m.param_dtype, remat=m.remat, scan_layers=scan_layers(config),
                 attention=m.get("attention", "auto"))
    graphdef, params = init_model(cfg, seed=config.seed, mesh=mesh)
    return graphdef, params, cfg, tokenizer


def warm_start(config, graphdef, params, mesh, task, tokenizer, train_examples, model_cfg, guard=None):
    """SFT on demonstrations, cached under sft.cache_dir keyed by everything that determines the result.

    A preemption signal (``guard.requested``, on any process) stops SFT early; the partial result is not
    cached."""
    stop = (lambda: False) if guard is None else (lambda: parallel.process_any(guard.requested))
    s = config.sft
    seed = config.seed if s.seed < 0 else s.seed
    key = sft.cache_key(str(model_cfg), config.task.to_dict(), s.to_dict(), seed,
                        config.rollout.max_new_tokens, config.model.hf_path)
    if s.cache:
        cached = sft.cached_params(s.cache_dir, key, params)
        if cached is not None:
            log.info("warm start: reusing cached SFT params %s/%s", s.cache_dir, key)
            return cached, {"sft/cached": 1.0}
    t0 = time.perf_counter()
    data = sft.build_dataset(task, tokenizer, train_examples[:s.num_examples],
                             demos_per_example=s.demos_per_example,
                             max_new_tokens=config.rollout.max_new_tokens, seed=seed)
    bar = tqdm(total=s.steps, desc="warm start (SFT)", leave=False, disable=jax.process_index() != 0)

    def progress(i, loss):
        bar.n = i + 1
        bar.set_postfix(loss=f"{loss:.3f}")
        bar.refresh()

    params, history = sft.train(graphdef, params, mesh, data, steps=s.steps, batch_size=s.batch_size,
                                learning_rate=s.learning_rate, warmup_steps=s.warmup_steps, seed=seed,
                                log=progress, should_stop=stop)
    bar.close()
    if stop():
        return params, {}
    if s.cache:
        sft.save_cached_params(s.cache_dir, key, params)
    elapsed = parallel.process_max({"sft/time_s": time.perf_counter() - t0})
    return params, {"sft/final_loss": history[-1], **elapsed, "sft/examples": float(len(data[0]))}


def _state_tree(state: TrainState) -> dict:
    tree = {"step": state.step, "params": state.params, "opt_state": state.opt_state, "key": state.key}
    if state.ref_params is not None:
        tree["ref_params"] = state.ref_params
    return tree


def _from_tree(tree: dict) -> TrainState:
    return TrainState(tree["step"], tree["params"], tree["opt_state"], tree["key"], tree.get("ref_params"))


# --------------------------------------------------------------------------------------------- loop
def collect(config, sampler, params, task, tokenizer, pool, stream, position, key):
    """One step's rollouts (with dynamic sampling when enabled); returns (rollouts, new position)."""
    r_cfg, P = config.rollout, config.rollout.prompts_per_step
    kwargs = dict(num_samples=r_cfg.num_samples, max_new_tokens=r_cfg.max_new_tokens,
                  temperature=r_cfg.temperature, top_p=r_cfg.top_p, top_k=r_cfg.top_k,
                  chunk_prompts=r_cfg.sample_prompts, ignore_eos=r_cfg.ignore_eos, decode_slots=r_cfg.decode_slots)
    r = rollout.generate(sampler, params, task, tokenizer, pool, stream.take(position, P), key=key, **kwargs)
    position += P
    if not r_cfg.dynamic_sampling:
        return r, position, {}
    kept = [r.select(r.rewards.max(1) > r.rewards.min(1))]
    refills = 0
    while sum(len(k.examples) for k in kept) < P:
        if refills == r_cfg.max_refills:
            raise RuntimeError(
                f"dynamic sampling found only {sum(len(k.examples) for k in kept)} of {P} prompts with "
                f"non-constant rewards after rollout.max_refills={r_cfg.max_refills} refills; raise the cap or "
                "disable rollout.dynamic_sampling.")
        refills += 1
        extra = rollout.generate(sampler, params, task, tokenizer, pool, stream.take(position, P),
                                 key=jax.random.fold_in(key, refills), **kwargs)
        position += P
        kept.append(extra.select(extra.rewards.max(1) > extra.rewards.min(1)))
    merged = rollout.Rollouts.concat(kept)
    merged = merged.select(np.arange(len(merged.examples)) < P)
    return merged, position, {"rollout/refills": float(refills)}


def load_examples(config: ConfigDict, task) -> tuple[list, list]:
    """(train, test) examples; an empty split is one error naming its file (or the generator's size)."""
    out = []
    for split, num in (("train", config.task.num_train), ("test", config.eval.num_prompts)):
        examples = task.examples(split, num=num, seed=config.seed)
        if not examples:
            source = config.task.options.get(f"{split}_files") or None
            where = (f"task.options.{split}_files={source!r} has no rows" if source else
                     f"task {config.task.name!r} produced no {split} examples")
            raise ValueError(f"the {split} split is empty: {where}.")
        out.append(examples)
    return out[0], out[1]


class VerifierError(RuntimeError):
    """Every response of several consecutive steps failed in the verifier."""


class VerifierMonitor:
    """Verifier counters per phase (train / eval), per step and cumulative (saved in checkpoints so they
    survive resume), a loud console line when a step's share of failed responses exceeds
    ``task.max_error_frac``, and a stop when every response of ``task.max_failed_steps`` consecutive train
    steps failed. Counts are summed over processes, so every process takes the same decision."""

    KINDS = ("scored", "errors", "invalid", "timeouts", "restarts")

    def __init__(self, pool: VerifierPool, max_error_frac: float, max_failed_steps: int,
                 totals: dict[str, float] | None = None, say=print):
        self.pool, self.max_error_frac, self.max_failed_steps = pool, max_error_frac, max_failed_steps
        self.totals: dict[str, float] = dict(totals or {})
        self.failed_streak = 0
        self.say = say

    def take(self, step: int) -> dict[str, float]:
        """Metrics of the scoring done since the previous call: ``verifier/<phase>/<kind>`` for this step
        and ``verifier/<phase>/<kind>_total`` since the run began."""
        counts, examples = self.pool.take_counts()
        phases = ("train", "eval") + tuple(sorted(set(counts) - {"train", "eval"}))
        flat = parallel.process_sum({f"{phase}/{kind}": float(counts.get(phase, {}).get(kind, 0))
                                     for phase in phases for kind in self.KINDS})
        out = {}
        for name, value in sorted(flat.items()):
            self.totals[name] = self.totals.get(name, 0.0) + value
            out[f"verifier/{name}"] = value
            out[f"verifier/{name}_total"] = self.totals[name]
        for phase in phases:
            scored = flat.get(f"{phase}/scored", 0.0)
            failed = flat.get(f"{phase}/errors", 0.0) + flat.get(f"{phase}/timeouts", 0.0)
            if scored and failed / scored > self.max_error_frac:
                first = (examples.get(phase) or ["on another process"])[0]
                self.say(f"WARNING step {step} ({phase}): {failed:.0f} of {scored:.0f} responses "
                         f"({failed / scored:.0%}) failed in the verifier and scored 0 (e.g. {first}).")
            if phase == "train" and scored:
                self.failed_streak = self.failed_streak + 1 if failed == scored else 0
                if self.failed_streak >= self.max_failed_steps:
                    first = (examples.get(phase) or ["on another process"])[0]
                    raise VerifierError(
                        f"every response of the last {self.failed_streak} training steps failed in the verifier "
                        f"(e.g. {first}); fix the task's score function (task.max_failed_steps="
                        f"{self.max_failed_steps} stops the run; earlier checkpoints are kept).")
        return out


def _reset_outputs(workdir: str, start: int) -> None:
    """Remove derived files that describe steps after ``start`` (they are rewritten when the run gets there):
    the final evaluation, the report and its plots, the export; on a fresh start the initial evaluation."""
    names = ["eval_final.json", "report.md", "training_curves.png", "pass_at_k.png", "hf_export"]
    if start == 0:
        names.append("eval_initial.json")
    details = os.path.join(workdir, EVAL_DETAILS)
    if os.path.isdir(details):
        names += [os.path.join(EVAL_DETAILS, f) for f in os.listdir(details)
                  if not f.startswith("step_") or int(f[5:11]) > start or start == 0]
    for name in names:
        path = os.path.join(workdir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)


EVAL_DETAILS = "eval_details"


def _save_eval_details(workdir: str, step: int, examples: Sequence, per_prompt: dict[str, np.ndarray]) -> None:
    """``eval_details/step_<step>.json``: the per-prompt results of the evaluation after ``step`` RL steps
    (``evaluation.evaluate``), in the order of the held-out examples, with their data sources."""
    record = {"step": step, "data_source": [ex.data_source for ex in examples],
              **{name: np.asarray(v).tolist() for name, v in per_prompt.items()}}
    os.makedirs(os.path.join(workdir, EVAL_DETAILS), exist_ok=True)
    with open(os.path.join(workdir, EVAL_DETAILS, f"step_{step:06d}.json"), "w") as f:
        json.dump(record, f)


def _finished(workdir: str, config: ConfigDict) -> bool:
    need = ["eval_final.json", "report.md"] + (["hf_export/config.json"] if config.train.export_hf else [])
    return all(os.path.exists(os.path.join(workdir, name)) for name in need)


def train(config: ConfigDict, workdir: str, *, stop_after: int | None = None,
          new_run: bool = False) -> dict[str, Any]:
    """Run (or resume) the experiment described by ``config`` in ``workdir``; returns the final summary.

    Every check that can fail (config, data files, workdir lock / ownership / writability) runs before the
    model is built. ``new_run``: the workdir holds another run (a different config): move its files to
    ``previous_runs/`` and start afresh instead of refusing. ``stop_after``: checkpoint and return after this
    global step, as if preempted (status "stopped").
    """
    plan = validate(config)
    task = make_task(config)
    train_examples, test_examples = load_examples(config, task)
    lock = workdir_lib.claim(workdir, json.loads(config.to_json_best_effort()), new_run=new_run)
    try:
        return _train(config, workdir, plan, task, train_examples, test_examples, stop_after)
    finally:
        lock.release()


def _train(config, workdir, plan, task, train_examples, test_examples, stop_after) -> dict[str, Any]:
    is_main = jax.process_index() == 0
    mesh = parallel.make_mesh(**config.mesh.to_dict())
    graphdef, params, model_cfg, tokenizer = build_model(config, mesh, workdir)
    stream = DataStream(train_examples, config.seed)
    sampler = Sampler(graphdef, model_cfg, mesh=mesh, pad_id=tokenizer.pad_token_id,
                      decode_layout=config.rollout.decode_layout)
    pool = VerifierPool(num_workers=config.task.verifier_workers, timeout_s=config.task.verifier_timeout_s)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.train.keep_checkpoints)
    guard = PreemptionGuard()
    total_steps = sum(steps for steps, _ in plan)
    steps_fns: dict[int, tuple] = {}

    def step_fns(stage: int):
        if stage not in steps_fns:
            steps_fns[stage] = make_train_step(graphdef, plan[stage][1], mesh, params)
        return steps_fns[stage]

    def stage_of(step: int) -> int:
        edge = 0
        for i, (steps, _) in enumerate(plan):
            edge += steps
            if step < edge:
                return i
        return len(plan) - 1

    root = jax.random.PRNGKey(config.seed)
    eval_kwargs = dict(num_samples=config.eval.num_samples, max_new_tokens=config.rollout.max_new_tokens,
                       temperature=config.eval.temperature, top_p=config.eval.top_p, greedy=config.eval.greedy,
                       batch_prompts=config.eval.sample_prompts)
    state = step_fns(0)[0](params, jax.random.fold_in(root, 1))
    writer = None
    summary: dict[str, Any] = {"workdir": workdir}
    preempted = lambda: parallel.process_any(guard.requested)  # noqa: E731 - the same answer on every process
    try:
        restored = ckpt.restore_latest(_state_tree(state))
        start = 0 if restored is None else restored[0]
        if start > total_steps:
            raise ValueError(f"workdir {workdir} has a checkpoint at step {start} but this config trains "
                             f"{total_steps} steps; raise train.steps or use another workdir.")
        if restored is not None and start == total_steps and _finished(workdir, config):
            log.info("run in %s already finished at step %d; nothing to do (report: %s).", workdir, start,
                     os.path.join(workdir, "report.md"))
            with open(os.path.join(workdir, "eval_final.json")) as f:
                summary.update(status="done", step=start, final=json.load(f))
            return summary
        if is_main:
            _reset_outputs(workdir, start)
        writer = MetricWriter(workdir, purge_step=start + 1 if restored is not None else 0)
        writer.truncate_after(start if restored is not None else -1)
        monitor = VerifierMonitor(pool, config.task.max_error_frac, config.task.max_failed_steps,
                                  None if restored is None else restored[2].get("verifier"),
                                  say=tqdm.write if is_main else (lambda _: None))
        if restored is None:
            position = 0
            if config.sft.steps > 0:
                params, sft_metrics = warm_start(config, graphdef, params, mesh, task, tokenizer,
                                                 train_examples, model_cfg, guard)
                if preempted():  # preempted during the warm start: nothing worth a checkpoint yet
                    summary.update(status="preempted", step=0, signal=guard.signal_name)
                    return summary
                writer.write(0, sft_metrics)
                state = step_fns(0)[0](params, jax.random.fold_in(root, 1))
            initial, per_prompt = evaluation.evaluate(sampler, state.params, task, tokenizer, pool,
                                                      test_examples, key=jax.random.fold_in(root, 2), **eval_kwargs)
            if is_main:
                _save_eval_details(workdir, 0, test_examples, per_prompt)
            initial.update(monitor.take(0))
            writer.write(0, initial)
            if is_main:
                _dump(os.path.join(workdir, "eval_initial.json"), initial)
        else:
            _, tree, meta = restored
            state, position = _from_tree(tree), int(meta["data_position"])
            log.info("resuming from checkpoint step %d of %d in %s", start, total_steps, ckpt.directory)
        bar = tqdm(total=total_steps, initial=start, desc="RL", disable=not is_main, dynamic_ncols=True)
        step = saved = start
        stopping = preempted()
        while step < total_steps:
            if stopping or (stop_after is not None and step >= stop_after):
                break
            stage = stage_of(step)
            t0 = time.perf_counter()
            rkey = jax.random.fold_in(jax.random.fold_in(root, 3), step)
            weights = sampler.prepare(state.params)  # the decode copy, once per policy update
            r, position, extra = collect(config, sampler, weights, task, tokenizer, pool, stream, position, rkey)
            del weights  # free it before the update
            verifier = monitor.take(step + 1)  # stops here, before the update, when every response failed
            bucket = next(b for b in sampler.buckets if b >= max(len(p) for p in r.prompts))
            batch = rollout.to_batch(r, bucket=bucket, pad_id=tokenizer.pad_token_id)
            t1 = time.perf_counter()
            state, step_metrics = step_fns(stage)[1](state, batch)
            step_metrics = jax.device_get(step_metrics)
            t2 = time.perf_counter()
            step += 1
            k = plan[stage][1].k
            scalars = {f"step/{name.replace(f'@{k}', '@k')}": v for name, v in step_metrics.items()
                       if np.ndim(v) == 0}
            scalars.update(rollout.rollout_metrics(r))
            scalars.update(extra)
            times = parallel.process_max({**r.timings, "time/update": t2 - t1, "time/step": t2 - t0})
            scalars.update({name: times[name] for name in r.timings})
            tokens = float(r.lengths.sum())
            scalars.update({"time/update": times["time/update"], "time/step": times["time/step"],
                            "perf/tokens_per_s": tokens / times["time/step"],
                            "train/stage": float(stage), "train/data_position": float(position)})
            if config.train.eval_every and step % config.train.eval_every == 0 and step < total_steps:
                ev, per_prompt = evaluation.evaluate(sampler, state.params, task, tokenizer, pool, test_examples,
                                                     key=jax.random.fold_in(root, 2), **eval_kwargs)
                if is_main:
                    _save_eval_details(workdir, step, test_examples, per_prompt)
                scalars.update(ev)
                verifier = {**verifier, **{k: v for k, v in monitor.take(step).items() if "/eval/" in k}}
            scalars.update(verifier)
            scalars = writer.write(step, scalars)
            bar.update(1)
            if is_main and step % config.train.log_every == 0:
                bar.write(console_line(step, total_steps, scalars, CONSOLE_KEYS))
            stopping = preempted()
            if step % config.train.checkpoint_every == 0 or step == total_steps or stopping or step == stop_after:
                ckpt.save(step, _state_tree(state), _meta(position, stage, monitor))
                saved = step
        bar.close()
        stopping = stopping or preempted()
        if stopping or step < total_steps:
            if step > 0 and step != saved:
                ckpt.save(step, _state_tree(state), _meta(position, stage_of(step - 1), monitor))
            ckpt.wait()
            status = "preempted" if stopping else "stopped"
            summary.update(status=status, step=step, signal=guard.signal_name)
            log.warning("%s: checkpoint saved at step %d", guard.signal_name or "stop_after", step)
            return summary
        final, per_prompt = evaluation.evaluate(sampler, state.params, task, tokenizer, pool, test_examples,
                                                key=jax.random.fold_in(root, 2), **eval_kwargs)
        if is_main:
            _save_eval_details(workdir, total_steps, test_examples, per_prompt)
        final.update(monitor.take(total_steps))
        writer.write(total_steps, final, phase="final")
        ckpt.wait()
        if config.train.export_hf:  # every process joins the parameter gathers; process 0 writes
            export(graphdef, state.params, model_cfg, tokenizer, os.path.join(workdir, "hf_export"),
                   hf_path=config.model.hf_path or None)
        if is_main:
            _dump(os.path.join(workdir, "eval_final.json"), final)
            report.write(workdir, config)
        summary.update(status="done", step=step, final=final)
        return summary
    finally:
        guard.restore()
        if writer is not None:
            writer.close()
        ckpt.close()
        pool.close()


def _meta(position: int, stage: int, monitor: VerifierMonitor) -> dict[str, Any]:
    return {"data_position": position, "stage": stage, "verifier": dict(monitor.totals)}


def export(graphdef: Any, params: Any, model_cfg: ModelConfig, tokenizer: Any, out_dir: str, *,
           hf_path: str | None = None) -> None:
    """Write a Hugging Face checkpoint (config.json, model.safetensors, tokenizer) of ``params`` that loads
    through ``AutoModelForCausalLM`` / ``AutoTokenizer`` with the trained model's logits and the training
    tokenizer's ids. ``hf_path``: the checkpoint the run started from; its tokenizer files are copied
    verbatim and its config.json's other fields (bos / eos ids, ...) are kept.

    Every process must call it (the parameters are gathered); process 0 writes."""
    extra = None
    if hf_path:
        with open(os.path.join(hf_path, "config.json")) as f:
            extra = json.load(f)
    hf.save_pretrained((graphdef, params), model_cfg, out_dir, tokenizer=tokenizer, tokenizer_source=hf_path or None,
                       extra_config=extra)


def _dump(path: str, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump({k: float(v) for k, v in obj.items()}, f, indent=2, sort_keys=True)
