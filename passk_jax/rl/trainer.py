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
import time
from typing import Any

import jax
import numpy as np
from ml_collections import ConfigDict
from tqdm import tqdm

from passk_jax import advantages, parallel, report, sft
from passk_jax.checkpoint import Checkpointer, PreemptionGuard
from passk_jax.logging import MetricWriter, console_line
from passk_jax.models import hf
from passk_jax.models.transformer import ATTENTION_KERNELS, ModelConfig, init as init_model
from passk_jax.rl import evaluation, rollout
from passk_jax.rl.step import StepConfig, TrainState, make_train_step, validate_batch
from passk_jax.sampling import Sampler
from passk_jax.tasks import get as get_task
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
    need(e.num_samples >= 1 and e.num_prompts >= 1, "eval.num_samples and eval.num_prompts must be >= 1.")
    need(config.train.checkpoint_every >= 1, "train.checkpoint_every must be >= 1.")
    need(str(config.model.get("scan_layers", False)).lower() in ("true", "false"),
         f"model.scan_layers must be true or false, got {config.model.get('scan_layers')!r}.")
    need(config.model.get("attention", "auto") in ATTENTION_KERNELS,
         f"model.attention must be one of {ATTENTION_KERNELS}, got {config.model.get('attention')!r}.")
    need(config.train.eval_every >= 0, "train.eval_every must be >= 0 (0 = only before and after).")
    need(config.model.hf_path or config.model.preset != "hf",
         "this config loads a Hugging Face checkpoint: set --config.model.hf_path=/path/to/model_dir.")
    need(config.model.hf_path or config.model.preset in ("tiny", "small"),
         f"model.preset must be 'tiny' or 'small' (or set model.hf_path), got {config.model.preset!r}.")
    need(not config.model.hf_path or os.path.isdir(config.model.hf_path),
         f"model.hf_path {config.model.hf_path!r} is not a directory.")
    plan = stages(config)
    need(sum(steps for steps, _ in plan) >= 0, "train.steps must be >= 0.")
    for steps, cfg in plan:
        need(steps >= 0, f"a stage has steps={steps}; it must be >= 0.")
        cfg.validate()
        if cfg.old_logprobs == "sampler" and (r.top_p < 1 or r.top_k > 0 or r.temperature != cfg.temperature):
            raise ValueError("step.old_logprobs='sampler' needs rollout.top_p=1, rollout.top_k=0 and "
                             "rollout.temperature equal to step.temperature; use old_logprobs='recompute'.")
        validate_batch(cfg, r.prompts_per_step, r.num_samples, r.prompts_per_step * r.num_samples)
        advantages.validate(cfg.estimator, r.num_samples, cfg.k, **dict(cfg.estimator_options))
    return plan


def make_task(config: ConfigDict):
    """The configured task (options set to "" or None count as unset); a wrong option is one clear error."""
    options = {k: v for k, v in config.task.options.to_dict().items() if v not in ("", None)}
    try:
        return get_task(config.task.name, **options)
    except TypeError as err:
        raise ValueError(f"task.options do not fit task {config.task.name!r}: {err}.") from err


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
                  chunk_prompts=r_cfg.sample_prompts)
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


def train(config: ConfigDict, workdir: str, *, stop_after: int | None = None) -> dict[str, Any]:
    """Run (or resume) the experiment described by ``config`` in ``workdir``; returns the final summary.

    ``stop_after``: checkpoint and return after this global step, as if preempted (status "stopped").
    """
    plan = validate(config)
    os.makedirs(workdir, exist_ok=True)
    is_main = jax.process_index() == 0
    if is_main:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
    mesh = parallel.make_mesh(**config.mesh.to_dict())
    graphdef, params, model_cfg, tokenizer = build_model(config, mesh, workdir)
    task = make_task(config)
    train_examples = task.examples("train", num=config.task.num_train, seed=config.seed)
    test_examples = task.examples("test", num=config.eval.num_prompts, seed=config.seed)
    stream = DataStream(train_examples, config.seed)
    sampler = Sampler(graphdef, model_cfg, mesh=mesh, pad_id=tokenizer.pad_token_id)
    pool = VerifierPool(num_workers=config.task.verifier_workers, timeout_s=config.task.verifier_timeout_s)
    writer = MetricWriter(workdir)
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
    restored = ckpt.restore_latest(_state_tree(state))
    summary: dict[str, Any] = {"workdir": workdir}
    preempted = lambda: parallel.process_any(guard.requested)  # noqa: E731 - the same answer on every process
    try:
        if restored is None:
            start, position = 0, 0
            if config.sft.steps > 0:
                params, sft_metrics = warm_start(config, graphdef, params, mesh, task, tokenizer,
                                                 train_examples, model_cfg, guard)
                if preempted():  # preempted during the warm start: nothing worth a checkpoint yet
                    summary.update(status="preempted", step=0, signal=guard.signal_name)
                    return summary
                writer.write(0, sft_metrics)
                state = step_fns(0)[0](params, jax.random.fold_in(root, 1))
            initial, _ = evaluation.evaluate(sampler, state.params, task, tokenizer, pool, test_examples,
                                             key=jax.random.fold_in(root, 2), **eval_kwargs)
            writer.write(0, initial)
            if is_main:
                _dump(os.path.join(workdir, "eval_initial.json"), initial)
        else:
            start, tree, meta = restored
            state, position = _from_tree(tree), int(meta["data_position"])
            writer.truncate_after(start)
            log.info("resumed from checkpoint step %d in %s", start, ckpt.directory)
        bar = tqdm(total=total_steps, initial=start, desc="RL", disable=not is_main, dynamic_ncols=True)
        step = saved = start
        stopping = preempted()
        while step < total_steps:
            if stopping or (stop_after is not None and step >= stop_after):
                break
            stage = stage_of(step)
            t0 = time.perf_counter()
            rkey = jax.random.fold_in(jax.random.fold_in(root, 3), step)
            r, position, extra = collect(config, sampler, state.params, task, tokenizer, pool, stream,
                                         position, rkey)
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
            scalars.update(parallel.process_sum(pool.metrics()))
            tokens = float(r.lengths.sum())
            scalars.update({"time/update": times["time/update"], "time/step": times["time/step"],
                            "perf/tokens_per_s": tokens / times["time/step"],
                            "train/stage": float(stage), "train/data_position": float(position)})
            if config.train.eval_every and step % config.train.eval_every == 0 and step < total_steps:
                ev, _ = evaluation.evaluate(sampler, state.params, task, tokenizer, pool, test_examples,
                                            key=jax.random.fold_in(root, 2), **eval_kwargs)
                scalars.update(ev)
            scalars = writer.write(step, scalars)
            bar.update(1)
            if is_main and step % config.train.log_every == 0:
                bar.write(console_line(step, total_steps, scalars, CONSOLE_KEYS))
            stopping = preempted()
            if step % config.train.checkpoint_every == 0 or step == total_steps or stopping or step == stop_after:
                ckpt.save(step, _state_tree(state), {"data_position": position, "stage": stage})
                saved = step
        bar.close()
        stopping = stopping or preempted()
        if stopping or step < total_steps:
            if step > 0 and step != saved:
                ckpt.save(step, _state_tree(state), {"data_position": position, "stage": stage_of(step - 1)})
            ckpt.wait()
            status = "preempted" if stopping else "stopped"
            summary.update(status=status, step=step, signal=guard.signal_name)
            log.warning("%s: checkpoint saved at step %d", guard.signal_name or "stop_after", step)
            return summary
        final, _ = evaluation.evaluate(sampler, state.params, task, tokenizer, pool, test_examples,
                                       key=jax.random.fold_in(root, 2), **eval_kwargs)
        writer.write(total_steps, final)
        ckpt.wait()
        if config.train.export_hf:  # every process joins the parameter gathers; process 0 writes
            export(graphdef, state.params, model_cfg, tokenizer, os.path.join(workdir, "hf_export"))
        if is_main:
            _dump(os.path.join(workdir, "eval_final.json"), final)
            report.write(workdir, config)
        summary.update(status="done", step=step, final=final)
        return summary
    finally:
        guard.restore()
        writer.close()
        ckpt.close()
        pool.close()


def export(graphdef: Any, params: Any, model_cfg: ModelConfig, tokenizer: Any, out_dir: str) -> None:
    """Write a Hugging Face checkpoint (config.json, model.safetensors, tokenizer) of ``params``.

    Every process must call it (the parameters are gathered); process 0 writes."""
    hf.save_pretrained((graphdef, params), model_cfg, out_dir)
    if jax.process_index() == 0:
        tokenizer.save_pretrained(out_dir)


def _dump(path: str, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump({k: float(v) for k, v in obj.items()}, f, indent=2, sort_keys=True)
