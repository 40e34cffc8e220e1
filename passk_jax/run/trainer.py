"""The training loop in three parts: ``setup`` (workdir, task, model, resume or warm start and the initial
evaluation), ``rl_step(resources, programs, loop) -> (loop, metrics)`` (rollouts, score, train step, metrics,
evaluation, checkpoint; ``Run.rl_step`` threads the loop state) and ``finish`` (final evaluation, export,
report); ``train(spec, workdir)`` runs all three. The run's parts are in ``passk_jax/run/state.py``.

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
import hashlib
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
from passk_jax.models import hf, lora
from passk_jax.models.transformer import ModelConfig, init as init_model, split
from passk_jax.rl import rollout
from passk_jax.run import evaluation, report, samples, sft, workdir as workdir_lib
from passk_jax.run.checkpoint import Checkpointer, PreemptionGuard
from passk_jax.run.data import DataStream, check_prompts, load_examples, make_task
from passk_jax.run.metric_log import MetricWriter, console_line, repair_jsonl
from passk_jax.run.monitor import VerifierMonitor
from passk_jax.run.spec import RolloutSpec, RunSpec, field_defaults
from passk_jax.run.state import LoopState, Programs, Resources, RunKeys, checkpoint_tree, state_from_tree
from passk_jax.sampling import Sampler, choose_decode_mesh, decode_copy_bytes, device_memory_bytes
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


def model_config(spec: RunSpec, tokenizer: Any) -> ModelConfig:
    """The run's architecture without loading weights: the checkpoint's config.json, or the preset sized to
    the tokenizer."""
    m = spec.model
    if m.hf_path:
        with open(os.path.join(m.hf_path, "config.json")) as f:
            return hf.config_from_hf(json.load(f), dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat,
                                     scan_layers=m.scan_layers, attention=m.attention)
    return getattr(ModelConfig, m.preset)(vocab_size=len(tokenizer), max_position_embeddings=m.max_len,
                                          dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat,
                                          scan_layers=m.scan_layers, attention=m.attention)


def base_identity(spec: RunSpec, model_cfg: ModelConfig) -> dict[str, str]:
    """What a LoRA checkpoint's adapters belong to: the base's path and a content hash (blake2b of the
    checkpoint's safetensors files; for a fresh preset model, of its architecture and seed, which determine
    its weights)."""
    m = spec.model
    h = hashlib.blake2b(digest_size=16)
    if m.hf_path:
        for name in sorted(os.listdir(m.hf_path)):
            if name.endswith(".safetensors"):
                h.update(name.encode())
                with open(os.path.join(m.hf_path, name), "rb") as f:
                    for block in iter(lambda: f.read(1 << 24), b""):
                        h.update(block)
        return {"path": os.path.abspath(m.hf_path), "hash": h.hexdigest()}
    h.update(json.dumps({"model": dataclasses.asdict(model_cfg), "seed": spec.seed}, sort_keys=True,
                        default=str).encode())
    return {"path": f"preset:{m.preset}", "hash": h.hexdigest()}


def with_adapters(spec: RunSpec, model_cfg: ModelConfig, params: Any, mesh: jax.sharding.Mesh) -> Any:
    """``params``, or with ``model.lora_rank`` > 0 the frozen base with fresh adapters (``lora.LoraParams``)."""
    cfg = spec.model.lora
    if cfg is None:
        return params
    return lora.LoraParams(params, lora.init_adapters(model_cfg, cfg, RunKeys(spec.seed).adapters, mesh), cfg.scale)


def decode_mesh(spec: RunSpec, mesh: jax.sharding.Mesh, model_cfg: ModelConfig, params: Any) -> jax.sharding.Mesh:
    """The sampler's mesh (``rollout.decode_mesh``; ``sampling.choose_decode_mesh``): the training mesh, or the
    same devices factored for decoding, e.g. tensor-parallel over a node's GPUs when the replicated decode
    copy would not fit."""
    return choose_decode_mesh(spec.rollout.decode_mesh, mesh, model_cfg, decode_copy_bytes(model_cfg, params),
                              device_memory_bytes(),
                              jax.local_device_count(), spec.rollout.decode_slots, spec.rollout.decode_layout)


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
    cfg = model_config(spec, tokenizer)
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


PEFT_DIR = "peft_adapter"


def export(graphdef: Any, params: Any, model_cfg: ModelConfig, tokenizer: Any, out_dir: str, *,
           hf_path: str | None = None, lora_cfg: lora.LoraConfig | None = None) -> None:
    """Write a Hugging Face checkpoint (config.json, model.safetensors, tokenizer) of ``params`` that loads
    through ``AutoModelForCausalLM`` / ``AutoTokenizer`` with the trained model's logits and the training
    tokenizer's ids. ``hf_path``: the checkpoint the run started from; its tokenizer files are copied
    verbatim and its config.json's other fields (bos / eos ids, ...) are kept.

    A LoRA policy (``lora.LoraParams``) is written merged (``W + (alpha / r) A B``), and its adapters also as a
    PEFT directory ``<out_dir>/peft_adapter`` (``peft.PeftModel.from_pretrained(base, that directory)``).

    Every process must call it (the parameters are gathered); process 0 writes."""
    extra = None
    if hf_path:
        with open(os.path.join(hf_path, "config.json")) as f:
            extra = json.load(f)
    merged = jax.jit(lora.merged)(params) if lora.is_lora(params) else params
    hf.save_pretrained((graphdef, merged), model_cfg, out_dir, tokenizer=tokenizer, tokenizer_source=hf_path or None,
                       extra_config=extra)
    if lora_cfg is not None and lora.is_lora(params):
        adapters = jax.tree.map(parallel.to_host, params.adapters)
        if jax.process_index() == 0:
            lora.save_peft(os.path.join(out_dir, PEFT_DIR), adapters, model_cfg, lora_cfg, base_path=hf_path or "")


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


# --------------------------------------------------------------------------------------------- the loop
def evaluate(res: Resources, params: Any, step: int) -> dict[str, float]:
    """Held-out evaluation of ``params`` (the same key every time); its per-prompt results go to
    ``eval_details/step_<step>.json``."""
    e = res.spec.eval
    with res.timers.phase("eval"):
        out, per_prompt = evaluation.evaluate(
            res.env, params, res.test_examples, num_samples=e.num_samples,
            max_new_tokens=res.spec.rollout.max_new_tokens, temperature=e.temperature, top_p=e.top_p,
            greedy=e.greedy, batch_prompts=e.sample_prompts, key=res.keys.eval,
            on_rollouts=lambda r: record_samples(res, r, "eval", step))
        if res.is_main:
            _save_eval_details(res.workdir, step, res.test_examples, per_prompt)
    return out


def record_samples(res: Resources, r: rollout.Rollouts, phase: str, step: int) -> None:
    """A few prompts of ``r`` with their responses, rewards and extracted answers: ``samples/step_<step>
    .jsonl``, TensorBoard text, and (after an evaluation) one example on the console. Process 0 writes."""
    t = res.spec.train
    if not res.is_main or t.samples_prompts == 0:
        return
    recs = samples.records(r, res.env.task, phase=phase, num_prompts=t.samples_prompts,
                           per_prompt=t.samples_responses)
    if not recs:
        return
    samples.write(res.workdir, step, recs)
    if res.writer is not None:
        res.writer.write_text(f"samples/{phase}", samples.markdown(recs), step, table=samples.table(recs))
    if phase == "eval":
        tqdm.write(samples.console(recs[0], step))


def save(res: Resources, loop: LoopState) -> LoopState:
    """Checkpoint the loop state (asynchronously; ``wait_for_checkpoints`` blocks until it is on disk)."""
    meta = {"data_position": loop.position, "stage": res.spec.stage_of(max(loop.step - 1, 0)),
            "verifier": dict(res.monitor.totals)}
    if res.base_id is not None:
        meta["lora_base"] = res.base_id
    with res.timers.phase("checkpoint"):
        res.ckpt.save(loop.step, checkpoint_tree(loop.state), meta)
    return dataclasses.replace(loop, saved=loop.step)


def wait_for_checkpoints(res: Resources) -> None:
    with res.timers.phase("checkpoint"):
        res.ckpt.wait()


def log_scalars(res: Resources, step: int, scalars: dict[str, float], **kwargs) -> dict[str, float]:
    """``MetricWriter.write`` (process 0 writes; every process gets the scalars back)."""
    with res.timers.phase("logging"):
        return res.writer.write(step, scalars, **kwargs)


def rl_step(res: Resources, programs: Programs, loop: LoopState) -> tuple[LoopState, dict[str, float]]:
    """One RL step from ``loop``: sample and score rollouts, update, log the metrics (and evaluate, checkpoint
    when due); returns the next loop state and the logged metrics."""
    spec, sampler, step = res.spec, res.env.sampler, loop.step
    stage, cfg, train_step = programs.for_step(step)
    t0 = time.perf_counter()
    weights = sampler.prepare(loop.state.params)  # the decode copy, once per policy update
    if lora.is_lora(loop.state.params) and weights.source is not loop.state.params.adapters:
        raise RuntimeError(f"step {step + 1}: the sampler's decode copy was not merged from the current LoRA "
                           "adapters: rollouts would sample a stale policy (the adapters are not reaching the "
                           "sampler); stopping.")
    r, position, extra = collect(spec.rollout, res.env, weights, res.stream, loop.position, res.keys.rollout(step),
                                 res.timers)
    del weights  # free it before the update
    every = spec.train.samples_every
    if every and (step + 1) % every == 0:
        record_samples(res, r, "train", step + 1)
    verifier = res.monitor.take(step + 1)  # stops here, before the update, when every response failed
    with res.timers.phase("batch assembly"):
        batch = rollout.to_batch(r)
    t1 = time.perf_counter()
    with res.timers.phase("update"):
        state, step_metrics = res.timers.wait(train_step(loop.state, batch))
    step_metrics = jax.device_get(step_metrics)
    t2 = time.perf_counter()
    step += 1
    loop = dataclasses.replace(loop, state=state, step=step, position=position)
    scalars = {f"step/{name}": v for name, v in step_metrics.items() if np.ndim(v) == 0}
    scalars.update(rollout.rollout_metrics(r))
    scalars.update(extra)
    times = parallel.process_max({**r.timings, "time/update": t2 - t1, "time/step": t2 - t0})
    scalars.update({name: times[name] for name in r.timings})
    tokens = float(r.lengths.sum())
    scalars.update({"time/update": times["time/update"], "time/step": times["time/step"],
                    "perf/tokens_per_s": tokens / times["time/step"],
                    "train/stage": float(stage), "train/k": float(cfg.k),
                    "train/data_position": float(position)})
    total = spec.total_steps
    if spec.train.eval_every and step % spec.train.eval_every == 0 and step < total:
        scalars.update(evaluate(res, state.params, step))
        verifier = {**verifier, **{k: v for k, v in res.monitor.take(step).items() if "/eval/" in k}}
    scalars.update(verifier)
    scalars = log_scalars(res, step, scalars)
    res.bar.update(1)
    if res.is_main and step % spec.train.log_every == 0:
        res.bar.write(console_line(step, total, scalars, CONSOLE_KEYS))
    loop = dataclasses.replace(loop, stopping=res.preempted())
    if step % spec.train.checkpoint_every == 0 or step == total or loop.stopping:
        loop = save(res, loop)
    return loop, scalars


def same_base(saved: dict | None, now: dict | None) -> bool:
    """Whether a checkpoint's base (its ``lora_base`` metadata) is this run's: the same content hash (the path
    may differ: a relative ``model.hf_path`` from another directory, a copied checkpoint); None = no LoRA."""
    return (saved or {}).get("hash") == (now or {}).get("hash")


def base_mismatch(workdir: str, saved: dict | None, now: dict | None) -> str:
    if saved is None:
        return (f"workdir {workdir} holds a full fine-tuning checkpoint, but this run trains LoRA adapters "
                "(model.lora_rank > 0); use another workdir.")
    if now is None:
        return (f"workdir {workdir} holds LoRA adapters of base {saved['path']}, but this run fine-tunes every weight "
                "(model.lora_rank=0); use another workdir.")
    return (f"workdir {workdir} holds LoRA adapters trained on base {saved['path']} (content hash {saved['hash']}), "
            f"but this run's base {now['path']} has hash {now['hash']}; resume with the same base or use another "
            "workdir.")


@dataclasses.dataclass(eq=False)
class Run:
    """A run between ``setup`` and ``finish``: its ``Resources``, its ``Programs`` and its ``LoopState``
    (``passk_jax/run/state.py``), with the calls a script drives it by (README, "Driving a custom loop").
    ``status`` is "running" until setup or ``finish`` decides ("done", "preempted", "stopped"); ``close()``
    releases every resource and the workdir lock (``train`` and a ``with`` block call it). ``res.timers``
    (``passk_jax.timing``) hears of every phase: the warm start, the rollout's phases, batch assembly, update,
    eval, checkpoint, logging."""

    res: Resources
    programs: Programs
    loop: LoopState | None = None
    status: str = "running"
    summary: dict[str, Any] = dataclasses.field(default_factory=dict)

    # the views a script reads
    spec = property(lambda self: self.res.spec)
    env = property(lambda self: self.res.env)
    test_examples = property(lambda self: self.res.test_examples)
    root = property(lambda self: self.res.keys.root)
    state = property(lambda self: self.loop.state)
    step = property(lambda self: self.loop.step)

    @property
    def running(self) -> bool:
        """Whether another ``rl_step`` is due: still running, not preempted, steps left."""
        return self.status == "running" and not self.loop.stopping and self.loop.step < self.res.spec.total_steps

    def rl_step(self) -> dict[str, float]:
        """``rl_step`` on this run's loop state (which it advances); returns the logged metrics."""
        self.loop, scalars = rl_step(self.res, self.programs, self.loop)
        return scalars

    def evaluate(self) -> dict[str, float]:
        """Held-out evaluation of the current policy (``evaluate``)."""
        return evaluate(self.res, self.loop.state.params, self.loop.step)

    def close(self) -> None:
        self.res.close()

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
    if spec.model.lora is not None:  # the rank against the matrices, before the workdir is claimed
        spec.model.lora.check(model_config(spec, tokenizer))
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
        params = with_adapters(spec, model_cfg, params, mesh)
        base_id = base_identity(spec, model_cfg) if lora.is_lora(params) else None
        stream = DataStream(train_examples, spec.seed)
        sampler = Sampler(graphdef, model_cfg, mesh=decode_mesh(spec, mesh, model_cfg, params),
                          pad_id=tokenizer.pad_token_id, decode_layout=spec.rollout.decode_layout)
        pool = VerifierPool(num_workers=spec.task.verifier_workers, timeout_s=spec.task.verifier_timeout_s)
        ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=spec.train.keep_checkpoints)
    except BaseException:
        lock.release()
        raise
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), params)
    env = rollout.Env(sampler, task, tokenizer, pool, stops)
    res = Resources(spec, workdir, mesh, graphdef, model_cfg, shapes, env, test_examples, stream, ckpt,
                    PreemptionGuard(), lock, timers, base_id=base_id,
                    data_counts=data_counts if spec.task.long_prompts == "skip" else {})
    run = Run(res, Programs(spec, graphdef, mesh, shapes), summary={"workdir": workdir})
    try:
        _start(run, params, train_examples)
    except BaseException:
        run.close()
        raise
    return run


def _start(run: Run, params: Any, train_examples: list) -> None:
    """Resume (restoring into the abstract state: nothing is built only to be overwritten), or warm start and
    evaluate; then open the progress bar (``setup``'s second half)."""
    res = run.res
    spec, workdir, total = res.spec, res.workdir, res.spec.total_steps
    restored = res.ckpt.restore_latest(res.restore_target())
    # LoRA: the adapters belong to one base (before anything of the run's outputs is touched)
    if restored is not None and parallel.process_any(not same_base(restored[2].get("lora_base"), res.base_id)):
        raise ValueError(base_mismatch(workdir, restored[2].get("lora_base"), res.base_id))
    start = 0 if restored is None else restored[0]
    if start > total:
        raise ValueError(f"workdir {workdir} has a checkpoint at step {start} but this config trains "
                         f"{total} steps; raise train.steps or use another workdir.")
    if res.is_main:
        repaired = repair_jsonl(os.path.join(workdir, "metrics.jsonl"))
        if repaired:
            log.warning("%s", repaired)
    # process 0's view decides (it may just have repaired metrics.jsonl), so all processes agree
    finished = bool(parallel.allgather(np.bool_(restored is not None and start == total and res.is_main
                                                and _finished(workdir, spec)))[0])
    if finished:
        log.info("run in %s already finished at step %d; nothing to do (report: %s).", workdir, start,
                 os.path.join(workdir, "report.md"))
        with open(os.path.join(workdir, "eval_final.json")) as f:
            run.summary.update(status="done", step=start, final=json.load(f))
        run.status = "done"
        return
    # files of later steps (a previous attempt's) stay until this run rewrites them: nothing is deleted here
    writer = MetricWriter(workdir, purge_step=start + 1 if restored is not None else 0,
                          wandb=wandb_sink(spec, workdir) if res.is_main else None)
    writer.replace_after(start if restored is not None else -1)
    monitor = VerifierMonitor(res.env.pool, spec.task.max_error_frac, spec.task.max_failed_steps,
                              None if restored is None else restored[2].get("verifier"),
                              say=tqdm.write if res.is_main else (lambda _: None))
    run.res = res = res.with_outputs(writer, monitor)
    if restored is None:
        if spec.sft.steps > 0:
            with res.timers.phase("warm start (SFT)"):
                params, sft_metrics = warm_start(spec, res.graphdef, params, res.mesh, res.env, train_examples,
                                                 res.model_cfg, res.guard)
            if res.preempted():  # preempted during the warm start: nothing worth a checkpoint yet
                run.summary.update(status="preempted", step=0, signal=res.guard.signal_name)
                run.status = "preempted"
                return
            log_scalars(res, 0, sft_metrics)
        loop = LoopState(run.programs.init_state(params, res.keys.train_state))
        initial = evaluate(res, loop.state.params, 0)
        initial.update(res.monitor.take(0))
        initial.update(res.data_counts)
        log_scalars(res, 0, initial)
        if res.is_main:
            _dump(os.path.join(workdir, "eval_initial.json"), initial)
    else:
        _, tree, meta = restored
        loop = LoopState(state_from_tree(tree, params), step=start, position=int(meta["data_position"]),
                         saved=start)
        log.info("resuming from checkpoint step %d of %d in %s", start, total, res.ckpt.directory)
    del params
    run.res = dataclasses.replace(res, bar=tqdm(total=total, initial=start, desc="RL", disable=not res.is_main,
                                                dynamic_ncols=True))
    run.loop = dataclasses.replace(loop, stopping=res.preempted())


def finish(run: Run) -> dict[str, Any]:
    """End the run: after a preemption or an early stop, checkpoint the last step; after the last step,
    evaluate, export and write the report. Returns the summary (``status``, ``step``, ``final``...)."""
    if run.status != "running":
        return run.summary
    res, loop = run.res, run.loop
    spec, workdir, step, total = res.spec, res.workdir, loop.step, res.spec.total_steps
    res.bar.close()
    stopping = loop.stopping or res.preempted()
    if stopping or step < total:
        if step > 0 and step != loop.saved:
            run.loop = loop = save(res, loop)
        wait_for_checkpoints(res)
        run.status = "preempted" if stopping else "stopped"
        run.summary.update(status=run.status, step=step, signal=res.guard.signal_name)
        log.warning("%s: checkpoint saved at step %d", res.guard.signal_name or "stop_after", step)
        return run.summary
    final = evaluate(res, loop.state.params, total)
    final.update(res.monitor.take(total))
    wait_for_checkpoints(res)  # the final step's checkpoint is on disk before any final result is recorded
    log_scalars(res, total, final, phase="final")
    if spec.train.export_hf:  # every process joins the parameter gathers; process 0 writes
        partial = os.path.join(workdir, "hf_export.partial")
        if res.is_main:
            shutil.rmtree(partial, ignore_errors=True)  # an interrupted earlier export
        export(res.graphdef, loop.state.params, res.model_cfg, res.env.tokenizer, partial,
               hf_path=spec.model.hf_path or None, lora_cfg=spec.model.lora)
        if res.is_main:
            _swap_in(partial, os.path.join(workdir, "hf_export"))
    if res.is_main:
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
