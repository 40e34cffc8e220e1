"""The training loop in three parts: ``setup`` (workdir, task, model, resume or warm start and the initial
evaluation), ``Run.rl_step`` (rollouts, score, train step, metrics, evaluation, checkpoint) and ``finish``
(final evaluation, export, report); ``train(spec, workdir)`` runs all three.

Starting in a workdir that has checkpoints resumes from the newest readable one; resuming is exact
(bit-identical on CPU) because every random draw is derived from (seed, step) and the data order from
(seed, position), and both are saved. SIGTERM / SIGINT save a checkpoint and stop cleanly (preemption).
Files of later steps that an earlier attempt wrote (metrics rows, evaluations, final results) stay until the
resumed run recomputes them; a workdir whose results cannot come from its checkpoints is refused at claim
time (``workdir.check_records``).

Multi-process runs (``parallel.initialize_distributed``) are one multi-controller job: every process runs
this same loop and the same compiled programs over the global mesh; each scores only its own rollout rows
(``rollout.generate``); host-side decisions (stop, resume, cache hits) and metrics (timings: max over
processes, verifier counters: sum) are agreed across processes; only process 0 writes config.json,
metrics.jsonl / TensorBoard, eval_*.json, report.md and the tokenizer; checkpoints and the Hugging Face
export are written by all processes together (Orbax / ``hf.save_pretrained`` coordinate the files).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from typing import Any, Sequence

import jax
import numpy as np
from tqdm import tqdm

from passk_jax import parallel
from passk_jax.models import hf
from passk_jax.models.transformer import ModelConfig, init as init_model, split
from passk_jax.rl import rollout
from passk_jax.rl.packed_step import make_packed_train_step
from passk_jax.rl.step import TrainState, abstract_state, make_train_step
from passk_jax.run import evaluation, report, samples, sft, workdir as workdir_lib
from passk_jax.run.checkpoint import Checkpointer, PreemptionGuard
from passk_jax.run.data import DataStream, check_prompts, load_examples, make_task
from passk_jax.run.metric_log import MetricWriter, console_line, repair_jsonl
from passk_jax.run.monitor import VerifierMonitor
from passk_jax.run.spec import RolloutSpec, RunSpec, field_defaults
from passk_jax.sampling import Sampler
from passk_jax.tasks.pool import VerifierPool
from passk_jax.tokenizer import build_char_tokenizer, load_tokenizer
from passk_jax.timing import NO_TIMERS, Timers

log = logging.getLogger("passk_jax")

CONSOLE_KEYS = {"rollout/reward_mean": "reward", "step/rollout_pass@k": "pass@k", "step/entropy": "entropy",
                "step/clip_high_frac": "clip_hi", "rollout/length_mean": "len", "perf/tokens_per_s": "tok/s",
                "time/sample": "t_sample", "time/score": "t_score", "time/update": "t_update"}


# --------------------------------------------------------------------------------------------- model
def model_context(spec: RunSpec) -> tuple[int, str]:
    """(context length in tokens, where it comes from) of the run's model, read without loading weights."""
    m = spec.model
    if m.hf_path:
        path = os.path.join(m.hf_path, "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no config.json in {m.hf_path}: expected a local Hugging Face checkpoint "
                                    "directory (model.hf_path).")
        with open(path) as f:
            cfg = hf.config_from_hf(json.load(f))
        return int(cfg.max_position_embeddings), f"max_position_embeddings in {path}"
    return m.max_len, "model.max_len"


def run_tokenizer(spec: RunSpec, workdir: str):
    """The run's tokenizer: the checkpoint's, or the character tokenizer (the workdir's copy when it has one)."""
    if spec.model.hf_path:
        return load_tokenizer(spec.model.hf_path)
    tok_dir = os.path.join(workdir, "tokenizer")
    if os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
        return load_tokenizer(tok_dir)
    return build_char_tokenizer()


def build_model(spec: RunSpec, mesh: jax.sharding.Mesh, workdir: str, tokenizer: Any = None):
    """(graphdef, params, ModelConfig, tokenizer): a local HF checkpoint, or a fresh char-level model.
    ``tokenizer``: the run's tokenizer when the caller has loaded it already (``run_tokenizer``)."""
    m = spec.model
    if m.hf_path:
        model, cfg = hf.load_pretrained(m.hf_path, dtype=m.dtype, param_dtype=m.param_dtype, mesh=mesh,
                                        remat=m.remat, scan_layers=m.scan_layers, attention=m.attention)
        graphdef, params = split(model)
        return graphdef, params, cfg, tokenizer or load_tokenizer(m.hf_path)
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
                 param_dtype=m.param_dtype, remat=m.remat, scan_layers=m.scan_layers, attention=m.attention)
    graphdef, params = init_model(cfg, seed=spec.seed, mesh=mesh)
    return graphdef, params, cfg, tokenizer


def check_wandb(spec: RunSpec) -> None:
    """ValueError when Weights & Biases logging is configured but the ``wandb`` package is missing."""
    if spec.train.wandb_project and spec.train.wandb_mode != "disabled":
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            raise ValueError(f"train.wandb_project={spec.train.wandb_project!r} is set but the wandb package is not "
                             "installed; pip install 'passk_jax[wandb]' (or unset train.wandb_project).")


def wandb_sink(spec: RunSpec, workdir: str) -> Any:
    """The run's ``WandbSink`` when ``train.wandb_project`` is set and ``train.wandb_mode`` is not "disabled"
    (None otherwise)."""
    t = spec.train
    if not t.wandb_project or t.wandb_mode == "disabled":
        return None
    from passk_jax.run.metric_log import WandbSink

    return WandbSink(workdir, t.wandb_project, entity=t.wandb_entity, mode=t.wandb_mode, config=spec.config_json)


def checkpoint_tree(state: TrainState) -> dict:
    """The array tree a checkpoint stores for a ``TrainState`` (``ref_params`` only when there is one)."""
    tree = {"step": state.step, "params": state.params, "opt_state": state.opt_state, "key": state.key}
    if state.ref_params is not None:
        tree["ref_params"] = state.ref_params
    return tree


def state_from_tree(tree: dict) -> TrainState:
    return TrainState(tree["step"], tree["params"], tree["opt_state"], tree["key"], tree.get("ref_params"))


def restore_target(spec: RunSpec, mesh: jax.sharding.Mesh, params: Any) -> dict:
    """The abstract checkpoint tree of a run (shapes, dtypes, shardings on ``mesh``) to restore into;
    nothing is compiled."""
    return checkpoint_tree(abstract_state(spec.stages[0].step, mesh, params))


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


# --------------------------------------------------------------------------------------------- phases
# config fields that do not change a warm start: where it is cached, and how verifiers run
_NOT_IN_WARM_START = {"sft": ("cache", "cache_dir"),
                      "task": ("verifier_workers", "verifier_timeout_s", "max_error_frac", "max_failed_steps")}


def warm_start_key(spec: RunSpec, model_cfg: ModelConfig, seed: int) -> str:
    """The SFT cache key: a hash of everything that determines the warm start (the model, the task and its
    data, the SFT settings, the seed, ``max_new_tokens``, the checkpoint it starts from), and nothing else —
    the same wherever the cache lives."""
    parts = {name: {k: v for k, v in spec.config_json[name].items() if k not in skip}
             for name, skip in _NOT_IN_WARM_START.items()}
    return sft.cache_key(str(model_cfg), parts["task"], parts["sft"], seed, spec.rollout.max_new_tokens,
                         spec.model.hf_path)


def warm_start(spec: RunSpec, graphdef, params, mesh, env: rollout.Env, train_examples, model_cfg, guard=None):
    """SFT on demonstrations, cached under sft.cache_dir keyed by everything that determines the result.

    A preemption signal (``guard.requested``, on any process) stops SFT early; the partial result is not
    cached."""
    stop = (lambda: False) if guard is None else (lambda: parallel.process_any(guard.requested))
    s = spec.sft
    seed = spec.seed if s.seed < 0 else s.seed
    key = warm_start_key(spec, model_cfg, seed)
    if s.cache:
        cached = sft.cached_params(s.cache_dir, key, params)
        if cached is not None:
            log.info("warm start: reusing cached SFT params %s/%s", s.cache_dir, key)
            return cached, {"sft/cached": 1.0}
    unwritable = sft.cache_unwritable(s.cache_dir) if s.cache else ""
    if unwritable:
        log.warning("warm start: cannot write to sft.cache_dir=%s (%s); the warm start is computed and used but "
                    "not cached.", s.cache_dir, unwritable)
    t0 = time.perf_counter()
    data = sft.build_dataset(env.task, env.tokenizer, train_examples[:s.num_examples],
                             demos_per_example=s.demos_per_example,
                             max_new_tokens=spec.rollout.max_new_tokens, seed=seed)
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
    if s.cache and not unwritable:
        try:
            sft.save_cached_params(s.cache_dir, key, params)
        except Exception as err:  # noqa: BLE001 - a cache that fails to save must not cost the warm start
            log.warning("warm start: could not cache it under %s (%s); the run continues with it.", s.cache_dir,
                        str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__)
    elapsed = parallel.process_max({"sft/time_s": time.perf_counter() - t0})
    return params, {"sft/final_loss": history[-1], **elapsed, "sft/examples": float(len(data[0]))}


def collect(r_cfg: RolloutSpec, env: rollout.Env, params, stream: DataStream, position: int, key,
            timers: Timers = NO_TIMERS):
    """One step's rollouts (with dynamic sampling when enabled); returns (rollouts, new position, metrics)."""
    P = r_cfg.prompts_per_step
    kwargs = dict(num_samples=r_cfg.num_samples, max_new_tokens=r_cfg.max_new_tokens,
                  temperature=r_cfg.temperature, top_p=r_cfg.top_p, top_k=r_cfg.top_k,
                  chunk_prompts=r_cfg.sample_prompts, ignore_eos=r_cfg.ignore_eos, decode_slots=r_cfg.decode_slots,
                  timers=timers)
    r = rollout.generate(env, params, stream.take(position, P), key=key, **kwargs)
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
        extra = rollout.generate(env, params, stream.take(position, P), key=jax.random.fold_in(key, refills),
                                 **kwargs)
        position += P
        kept.append(extra.select(extra.rewards.max(1) > extra.rewards.min(1)))
    merged = rollout.Rollouts.concat(kept)
    merged = merged.select(np.arange(len(merged.examples)) < P)
    return merged, position, {"rollout/refills": float(refills)}


# --------------------------------------------------------------------------------------------- run
@dataclasses.dataclass(eq=False)
class Run:
    """A run between ``setup`` and ``finish``: the model, the rollout environment, the train state and
    where the run stands (``step`` RL steps done, ``position`` prompts drawn). ``status`` is "running" until
    setup or ``finish`` decides ("done", "preempted", "stopped"); ``close()`` releases every resource and the
    workdir lock (``train`` and a ``with`` block call it). ``timers`` (``passk_jax.timing``) hears of every
    phase: the warm start, the rollout's phases, batch assembly, update, eval, checkpoint, logging."""

    spec: RunSpec
    workdir: str
    mesh: jax.sharding.Mesh
    graphdef: Any
    model_cfg: ModelConfig
    param_shapes: Any  # ShapeDtypeStructs (with shardings) of the parameters: what the train steps compile for
    env: rollout.Env
    test_examples: list
    stream: DataStream
    ckpt: Checkpointer
    guard: PreemptionGuard
    lock: workdir_lib.RunLock
    timers: Timers = NO_TIMERS
    state: TrainState | None = None
    step: int = 0
    position: int = 0
    saved: int = 0
    status: str = "running"
    summary: dict[str, Any] = dataclasses.field(default_factory=dict)
    writer: MetricWriter | None = None
    monitor: VerifierMonitor | None = None
    bar: Any = None
    stopping: bool = False
    data_counts: dict[str, float] = dataclasses.field(default_factory=dict)  # prompts left out (step-0 record)
    _fns: dict[tuple[int, int], tuple] = dataclasses.field(default_factory=dict)  # (stage, k) ->

    @property
    def is_main(self) -> bool:
        return jax.process_index() == 0

    @property
    def root(self) -> jax.Array:
        return jax.random.PRNGKey(self.spec.seed)

    @property
    def running(self) -> bool:
        """Whether another ``rl_step`` is due: still running, not preempted, steps left."""
        return self.status == "running" and not self.stopping and self.step < self.spec.total_steps

    def step_fns(self, stage: int, k: int | None = None) -> tuple:
        """(init_state, train_step) of a stage (at ``k`` when its step anneals k), built on first use."""
        cfg = self.spec.stages[stage].step
        if k is not None and cfg.k_schedule:
            cfg = dataclasses.replace(cfg, k=k, k_schedule=())
        if (stage, cfg.k) not in self._fns:
            make = make_train_step if cfg.packing == "off" else make_packed_train_step
            self._fns[stage, cfg.k] = make(self.graphdef, cfg, self.mesh, self.param_shapes)
        return self._fns[stage, cfg.k]

    def preempted(self) -> bool:
        """A preemption signal on any process (the same answer on every process)."""
        return parallel.process_any(self.guard.requested)

    def evaluate(self) -> dict[str, float]:
        """Held-out evaluation of the current policy (the same key every time); its per-prompt results go
        to ``eval_details/step_<step>.json``."""
        e = self.spec.eval
        with self.timers.phase("eval"):
            out, per_prompt = evaluation.evaluate(
                self.env, self.state.params, self.test_examples, num_samples=e.num_samples,
                max_new_tokens=self.spec.rollout.max_new_tokens, temperature=e.temperature, top_p=e.top_p,
                greedy=e.greedy, batch_prompts=e.sample_prompts, key=jax.random.fold_in(self.root, 2),
                on_rollouts=lambda r: self.record_samples(r, "eval", self.step))
            if self.is_main:
                _save_eval_details(self.workdir, self.step, self.test_examples, per_prompt)
        return out

    def record_samples(self, r: rollout.Rollouts, phase: str, step: int) -> None:
        """A few prompts of ``r`` with their responses, rewards and extracted answers: ``samples/step_<step>
        .jsonl``, TensorBoard text, and (after an evaluation) one example on the console. Process 0 writes."""
        t = self.spec.train
        if not self.is_main or t.samples_prompts == 0:
            return
        recs = samples.records(r, self.env.task, phase=phase, num_prompts=t.samples_prompts,
                               per_prompt=t.samples_responses)
        if not recs:
            return
        samples.write(self.workdir, step, recs)
        if self.writer is not None:
            self.writer.write_text(f"samples/{phase}", samples.markdown(recs), step, table=samples.table(recs))
        if phase == "eval":
            tqdm.write(samples.console(recs[0], step))

    def save(self, stage: int) -> None:
        with self.timers.phase("checkpoint"):
            self.ckpt.save(self.step, checkpoint_tree(self.state), {
                "data_position": self.position, "stage": stage, "verifier": dict(self.monitor.totals)})
        self.saved = self.step

    def wait_for_checkpoints(self) -> None:
        """Block until the asynchronous checkpoint saves are on disk."""
        with self.timers.phase("checkpoint"):
            self.ckpt.wait()

    def log(self, step: int, scalars: dict[str, float], **kwargs) -> dict[str, float]:
        """``MetricWriter.write`` (process 0 writes; every process gets the scalars back)."""
        with self.timers.phase("logging"):
            return self.writer.write(step, scalars, **kwargs)

    def rl_step(self) -> dict[str, float]:
        """One RL step: sample and score rollouts, update, log the metrics (and evaluate, checkpoint when
        due); returns the logged metrics."""
        spec, sampler, step = self.spec, self.env.sampler, self.step
        stage, cfg = spec.step_at(step)
        t0 = time.perf_counter()
        rkey = jax.random.fold_in(jax.random.fold_in(self.root, 3), step)
        weights = sampler.prepare(self.state.params)  # the decode copy, once per policy update
        r, self.position, extra = collect(spec.rollout, self.env, weights, self.stream, self.position, rkey,
                                          self.timers)
        del weights  # free it before the update
        every = spec.train.samples_every
        if every and (step + 1) % every == 0:
            self.record_samples(r, "train", step + 1)
        verifier = self.monitor.take(step + 1)  # stops here, before the update, when every response failed
        with self.timers.phase("batch assembly"):
            batch = rollout.to_batch(r)
        train_step = self.step_fns(stage, cfg.k)[1]
        t1 = time.perf_counter()
        with self.timers.phase("update"):
            self.state, step_metrics = self.timers.wait(train_step(self.state, batch))
        step_metrics = jax.device_get(step_metrics)
        t2 = time.perf_counter()
        self.step = step = step + 1
        scalars = {f"step/{name}": v for name, v in step_metrics.items() if np.ndim(v) == 0}
        scalars.update(rollout.rollout_metrics(r))
        scalars.update(extra)
        times = parallel.process_max({**r.timings, "time/update": t2 - t1, "time/step": t2 - t0})
        scalars.update({name: times[name] for name in r.timings})
        tokens = float(r.lengths.sum())
        scalars.update({"time/update": times["time/update"], "time/step": times["time/step"],
                        "perf/tokens_per_s": tokens / times["time/step"],
                        "train/stage": float(stage), "train/k": float(cfg.k),
                        "train/data_position": float(self.position)})
        total = spec.total_steps
        if spec.train.eval_every and step % spec.train.eval_every == 0 and step < total:
            scalars.update(self.evaluate())
            verifier = {**verifier, **{k: v for k, v in self.monitor.take(step).items() if "/eval/" in k}}
        scalars.update(verifier)
        scalars = self.log(step, scalars)
        self.bar.update(1)
        if self.is_main and step % spec.train.log_every == 0:
            self.bar.write(console_line(step, total, scalars, CONSOLE_KEYS))
        self.stopping = self.preempted()
        if step % spec.train.checkpoint_every == 0 or step == total or self.stopping:
            self.save(stage)
        return scalars

    def close(self) -> None:
        self.guard.restore()
        if self.writer is not None:
            self.writer.close()
        self.ckpt.close()
        self.env.pool.close()
        self.lock.release()

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def setup(spec: RunSpec, workdir: str, *, new_run: bool = False, timers: Timers = NO_TIMERS) -> Run:
    """Claim ``workdir`` and make the run ready for its next RL step: build the task, the model and the
    rollout environment, then resume from the newest readable checkpoint, or warm start (SFT) and evaluate
    the initial policy. A run that is already finished, or preempted during the warm start, comes back with
    that ``status`` and its ``summary``.

    Every check that needs only the config, the tokenizer and the data (data files and rows, every prompt
    against the model context: ``data.check_prompts``) runs before the workdir is claimed, and the workdir's
    (lock, ownership, recorded results vs checkpoints) before the model is built. ``new_run``: the workdir holds another run (a different config): move its files to
    ``previous_runs/`` and start afresh instead of refusing. ``timers``: see ``Run``."""
    check_wandb(spec)
    task = make_task(spec.task)
    train_examples, test_examples = load_examples(spec, task)
    if spec.sft.steps > 0 and not hasattr(task, "demonstrations"):
        raise ValueError(f"task {spec.task.name!r} has no demonstrations() for the warm start; set sft.steps=0.")
    context, source = model_context(spec)
    tokenizer = run_tokenizer(spec, workdir)
    splits, data_counts = check_prompts(spec, task, tokenizer, context, source,
                                        {"train": train_examples, "test": test_examples})
    train_examples, test_examples = splits["train"], splits["test"]
    try:  # evaluations stop at EOS even when rollouts ignore it
        stops = rollout.checkpoint_stop_ids(tokenizer, spec.model.hf_path)
    except ValueError:
        if not spec.rollout.ignore_eos:
            raise
        stops = ()
    lock = workdir_lib.claim(workdir, spec.config_json, new_run=new_run, defaults=field_defaults())
    try:
        mesh = parallel.make_mesh(data=spec.mesh.data, fsdp=spec.mesh.fsdp, tensor=spec.mesh.tensor)
        graphdef, params, model_cfg, tokenizer = build_model(spec, mesh, workdir,
                                                             tokenizer if spec.model.hf_path else None)
        stream = DataStream(train_examples, spec.seed)
        sampler = Sampler(graphdef, model_cfg, mesh=mesh, pad_id=tokenizer.pad_token_id,
                          decode_layout=spec.rollout.decode_layout)
        pool = VerifierPool(num_workers=spec.task.verifier_workers, timeout_s=spec.task.verifier_timeout_s)
        ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=spec.train.keep_checkpoints)
    except BaseException:
        lock.release()
        raise
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), params)
    run = Run(spec, workdir, mesh, graphdef, model_cfg, shapes, rollout.Env(sampler, task, tokenizer, pool, stops),
              test_examples, stream, ckpt, PreemptionGuard(), lock, timers, summary={"workdir": workdir},
              data_counts=data_counts if spec.task.long_prompts == "skip" else {})
    try:
        run.state = run.step_fns(0)[0](params, jax.random.fold_in(run.root, 1))
        _start(run, params, train_examples)
    except BaseException:
        run.close()
        raise
    return run


def _start(run: Run, params: Any, train_examples: list) -> None:
    """Resume, or warm start and evaluate; then open the progress bar (``setup``'s second half)."""
    spec, workdir, total = run.spec, run.workdir, run.spec.total_steps
    restored = run.ckpt.restore_latest(checkpoint_tree(run.state))
    start = 0 if restored is None else restored[0]
    if start > total:
        raise ValueError(f"workdir {workdir} has a checkpoint at step {start} but this config trains "
                         f"{total} steps; raise train.steps or use another workdir.")
    if run.is_main:
        repaired = repair_jsonl(os.path.join(workdir, "metrics.jsonl"))
        if repaired:
            log.warning("%s", repaired)
    # process 0's view decides (it may just have repaired metrics.jsonl), so all processes agree
    finished = bool(parallel.allgather(np.bool_(restored is not None and start == total and run.is_main
                                                and _finished(workdir, spec)))[0])
    if finished:
        log.info("run in %s already finished at step %d; nothing to do (report: %s).", workdir, start,
                 os.path.join(workdir, "report.md"))
        with open(os.path.join(workdir, "eval_final.json")) as f:
            run.summary.update(status="done", step=start, final=json.load(f))
        run.status = "done"
        return
    # files of later steps (a previous attempt's) stay until this run rewrites them: nothing is deleted here
    run.writer = MetricWriter(workdir, purge_step=start + 1 if restored is not None else 0,
                              wandb=wandb_sink(spec, workdir) if run.is_main else None)
    run.writer.replace_after(start if restored is not None else -1)
    run.monitor = VerifierMonitor(run.env.pool, spec.task.max_error_frac, spec.task.max_failed_steps,
                                  None if restored is None else restored[2].get("verifier"),
                                  say=tqdm.write if run.is_main else (lambda _: None))
    if restored is None:
        if spec.sft.steps > 0:
            with run.timers.phase("warm start (SFT)"):
                params, sft_metrics = warm_start(spec, run.graphdef, params, run.mesh, run.env, train_examples,
                                                 run.model_cfg, run.guard)
            if run.preempted():  # preempted during the warm start: nothing worth a checkpoint yet
                run.summary.update(status="preempted", step=0, signal=run.guard.signal_name)
                run.status = "preempted"
                return
            run.log(0, sft_metrics)
            run.state = run.step_fns(0)[0](params, jax.random.fold_in(run.root, 1))
        initial = run.evaluate()
        initial.update(run.monitor.take(0))
        initial.update(run.data_counts)
        run.log(0, initial)
        if run.is_main:
            _dump(os.path.join(workdir, "eval_initial.json"), initial)
    else:
        _, tree, meta = restored
        run.state, run.position = state_from_tree(tree), int(meta["data_position"])
        log.info("resuming from checkpoint step %d of %d in %s", start, total, run.ckpt.directory)
    run.bar = tqdm(total=total, initial=start, desc="RL", disable=not run.is_main, dynamic_ncols=True)
    run.step = run.saved = start
    run.stopping = run.preempted()


def finish(run: Run) -> dict[str, Any]:
    """End the run: after a preemption or an early stop, checkpoint the last step; after the last step,
    evaluate, export and write the report. Returns the summary (``status``, ``step``, ``final``...)."""
    if run.status != "running":
        return run.summary
    spec, workdir, step, total = run.spec, run.workdir, run.step, run.spec.total_steps
    run.bar.close()
    stopping = run.stopping or run.preempted()
    if stopping or step < total:
        if step > 0 and step != run.saved:
            run.save(spec.stage_of(step - 1))
        run.wait_for_checkpoints()
        run.status = "preempted" if stopping else "stopped"
        run.summary.update(status=run.status, step=step, signal=run.guard.signal_name)
        log.warning("%s: checkpoint saved at step %d", run.guard.signal_name or "stop_after", step)
        return run.summary
    final = run.evaluate()
    final.update(run.monitor.take(total))
    run.wait_for_checkpoints()  # the final step's checkpoint is on disk before any final result is recorded
    run.log(total, final, phase="final")
    if spec.train.export_hf:  # every process joins the parameter gathers; process 0 writes
        partial = os.path.join(workdir, "hf_export.partial")
        if run.is_main:
            shutil.rmtree(partial, ignore_errors=True)  # an interrupted earlier export
        export(run.graphdef, run.state.params, run.model_cfg, run.env.tokenizer, partial,
               hf_path=spec.model.hf_path or None)
        if run.is_main:
            _swap_in(partial, os.path.join(workdir, "hf_export"))
    if run.is_main:
        _dump(os.path.join(workdir, "eval_final.json"), final)
        report.write(workdir, spec)
    run.status = "done"
    run.summary.update(status="done", step=step, final=final)
    return run.summary


def train(spec: RunSpec, workdir: str, *, stop_after: int | None = None, new_run: bool = False,
          timers: Timers = NO_TIMERS) -> dict[str, Any]:
    """Run (or resume) the experiment described by ``spec`` in ``workdir``; returns the final summary.

    ``new_run``, ``timers``: see ``setup``. ``stop_after``: checkpoint and return after this global step, as if
    preempted (status "stopped")."""
    with setup(spec, workdir, new_run=new_run, timers=timers) as run:
        while run.running and (stop_after is None or run.step < stop_after):
            run.rl_step()
        return finish(run)


def _swap_in(new: str, path: str) -> None:
    """Replace the directory ``path`` by ``new`` (the old one is removed only once the new one is in place)."""
    old = path + ".old"
    if os.path.isdir(old):
        shutil.rmtree(old)
    if os.path.isdir(path):
        os.replace(path, old)
    os.replace(new, path)
    shutil.rmtree(old, ignore_errors=True)


EVAL_DETAILS = "eval_details"


def _save_eval_details(workdir: str, step: int, examples: Sequence, per_prompt: dict[str, np.ndarray]) -> None:
    """``eval_details/step_<step>.json``: the per-prompt results of the evaluation after ``step`` RL steps
    (``evaluation.evaluate``), in the order of the held-out examples, with their data sources."""
    record = {"step": step, "data_source": [ex.data_source for ex in examples],
              **{name: np.asarray(v).tolist() for name, v in per_prompt.items()}}
    os.makedirs(os.path.join(workdir, EVAL_DETAILS), exist_ok=True)
    path = os.path.join(workdir, EVAL_DETAILS, f"step_{step:06d}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(record, f)
    os.replace(path + ".tmp", path)


def _finished(workdir: str, spec: RunSpec) -> bool:
    """Whether the run's final results of step ``total_steps`` are all written (a final row of that step in
    metrics.jsonl, eval_final.json, report.md and, when exported, hf_export/)."""
    need = ["eval_final.json", "report.md"] + (["hf_export/config.json"] if spec.train.export_hf else [])
    return (workdir_lib.recorded(workdir).final_row == spec.total_steps
            and all(os.path.exists(os.path.join(workdir, name)) for name in need))


def _dump(path: str, obj: dict) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump({k: float(v) for k, v in obj.items()}, f, indent=2, sort_keys=True)
    os.replace(path + ".tmp", path)
