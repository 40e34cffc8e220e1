"""The typed description of one run: frozen sections (model, task, rollout, step, eval, train, sft, mesh)
under a ``RunSpec``, each checking its own fields where it is built; ``RunSpec`` checks what spans sections.

``RunSpec.from_config(config)`` is the one conversion from an ``ml_collections`` config (the named configs
of ``experiments/configs`` and their ``--config.a.b=value`` overrides); the library takes the spec and never
reads a config. ``RunSpec.config_json`` is the config as JSON, exactly what a workdir's ``config.json``
records (``passk_jax.run.workdir`` compares it field by field). ``check_host()`` adds the checks that depend on
this machine (device count, backend, files). Every failure is one sentence naming the field.
"""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import re
from collections.abc import Mapping
from typing import Any

from passk_jax.models.lora import TARGETS as LORA_TARGETS, LoraConfig
from passk_jax.models.transformer import ATTENTION_KERNELS
from passk_jax.rl.step import StepConfig, validate_batch
from passk_jax.sampling import DECODE_LAYOUTS


def _need(ok: bool, msg: str) -> None:
    if not ok:
        raise ValueError(msg)


# StepConfig fields where +inf is a legitimate setting: grad_clip_norm=inf clips nothing (like None, but a float
# that `--config.step.grad_clip_norm=inf` can set). Every other float of a spec must be finite.
_INF_OK = frozenset({"grad_clip_norm"})


def _check_finite(value: Any, name: str) -> None:
    """Every float in ``value`` (a section dataclass, or mappings / sequences of plain values, walked to the
    bottom) is finite; ValueError naming the first that is not by its dotted path (``step.learning_rate``,
    ``step.estimator_options.eta``, ``train.stages[0].step.eps_high``). NaN fails every comparison, so the
    sections' own range checks would otherwise report it with a rule it does not break."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            _check_finite(getattr(value, f.name), f"{name}.{f.name}" if name else f.name)
    elif isinstance(value, Mapping):
        for key, item in value.items():
            _check_finite(item, f"{name}.{key}" if name else str(key))
    elif isinstance(value, (tuple, list)):
        for i, item in enumerate(value):
            _check_finite(item, f"{name}[{i}]")
    elif isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral) and not math.isfinite(value):
        parent, _, leaf = name.rpartition(".")
        if not (value == math.inf and leaf in _INF_OK and (parent == "step" or parent.endswith(".step"))):
            raise ValueError(f"{name} must be a finite number, got {value}.")


def _check_sampling(section: str, temperature: float, top_p: float) -> None:
    """The sampling settings shared by training rollouts and evaluation."""
    _need(temperature >= 0, f"{section}.temperature must be >= 0, got {temperature}.")
    _need(0 < top_p <= 1, f"{section}.top_p must be in (0, 1], got {top_p}.")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A fresh character-level model (``preset`` "tiny" | "small") or a local Hugging Face checkpoint
    (``hf_path``; then ``preset`` is ignored). ``preset`` "hf": the run needs ``hf_path``, a directory on
    the machine that runs it (``RunSpec.check_host``)."""

    preset: str = "tiny"  # "tiny" | "small"; ignored when hf_path is set
    hf_path: str = ""  # local Hugging Face directory (config.json + *.safetensors + tokenizer)
    dtype: str = "float32"  # compute dtype ("bfloat16" on accelerators)
    param_dtype: str = "float32"
    remat: str = "none"  # activation rematerialisation policy of the layers
    scan_layers: bool = False  # True: lax.scan over layers (fast compile); False: unrolled (fast steps)
    attention: str = "auto"  # no-cache attention kernel: "auto" (splash on TPU, cuDNN on GPU, else blocked)
    max_len: int = 256  # context length of a fresh model (prompt + completion)
    lora_rank: int = 0  # > 0: train LoRA adapters of this rank on lora_targets, the base frozen (0: every weight)
    lora_alpha: float = 32.0  # the adapters' scale is lora_alpha / lora_rank
    lora_targets: tuple[str, ...] = tuple(LORA_TARGETS)  # of q, k, v, o, gate, up, down

    def __post_init__(self):
        _need(self.attention in ATTENTION_KERNELS,
              f"model.attention must be one of {ATTENTION_KERNELS}, got {self.attention!r}.")
        _need(bool(self.hf_path) or self.preset in ("tiny", "small", "hf"),
              f"model.preset must be 'tiny' or 'small' (or set model.hf_path), got {self.preset!r}.")
        _need(not isinstance(self.lora_rank, bool) and isinstance(self.lora_rank, int) and self.lora_rank >= 0,
              f"model.lora_rank must be an integer >= 0 (0: no LoRA), got {self.lora_rank!r}.")
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        LoraConfig(rank=max(self.lora_rank, 1), alpha=self.lora_alpha, targets=self.lora_targets)  # alpha, targets

    @property
    def lora(self) -> LoraConfig | None:
        """The LoRA configuration (None: full fine-tuning)."""
        if self.lora_rank == 0:
            return None
        return LoraConfig(rank=self.lora_rank, alpha=self.lora_alpha, targets=self.lora_targets)


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """A task of the ``passk_jax.tasks`` registry, its options, and the verifier's process settings."""

    name: str = "maze"
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # "" / None count as unset
    num_train: int | None = 4000  # training problems generated (or the first rows of train_files)
    verifier_workers: int = 1
    verifier_timeout_s: float = 10.0
    max_error_frac: float = 0.5  # warn loudly when a step's share of failed verifier calls exceeds this
    max_failed_steps: int = 3  # stop when every response of this many consecutive steps failed
    long_prompts: str = "error"  # a prompt that leaves no room for max_new_tokens: "error" (names file:line
    #                              before anything compiles) or "skip" (left out, counted)

    def __post_init__(self):
        t = self
        _need(t.long_prompts in ("error", "skip"),
              f"task.long_prompts must be 'error' or 'skip', got {t.long_prompts!r}.")
        _need(t.num_train is None or t.num_train >= 1,
              f"task.num_train must be >= 1 (or None: every row), got {t.num_train}.")
        _need(t.verifier_workers >= 0, f"task.verifier_workers must be >= 0 (0 = in-process), got {t.verifier_workers}.")
        _need(t.verifier_timeout_s > 0, f"task.verifier_timeout_s must be > 0, got {t.verifier_timeout_s}.")
        _need(0 <= t.max_error_frac <= 1, f"task.max_error_frac must be in [0, 1], got {t.max_error_frac}.")
        _need(t.max_failed_steps >= 1, f"task.max_failed_steps must be >= 1, got {t.max_failed_steps}.")

    @property
    def set_options(self) -> dict[str, Any]:
        """The options that are set (not "" or None): the keyword arguments of the task's constructor."""
        return {k: v for k, v in self.options.items() if v not in ("", None)}


@dataclasses.dataclass(frozen=True)
class RolloutSpec:
    """Training rollouts: P prompts x n samples per step, sampling settings, dynamic sampling."""

    prompts_per_step: int = 16  # P: prompts drawn per RL step
    num_samples: int = 16  # N: responses sampled per prompt
    max_new_tokens: int = 24  # response budget; longer responses are truncated
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # nucleus mass; 1 = off
    top_k: int = 0  # 0 = off
    sample_prompts: int = 0  # prompts per sampler call (0 = all P at once; chunk to bound the KV cache)
    ignore_eos: bool = False  # True: every response decodes max_new_tokens (fixed-length workloads)
    decode_slots: int = 64  # continuous-batching slots per sampler call (0 = lockstep rows)
    decode_layout: str = "auto"  # decode weights: "replicated", "training" or "auto" (DECODE_LAYOUTS)
    decode_mesh: str = "auto"  # the sampler's factoring of the devices: "auto", "training" or "DATA,FSDP,TENSOR"
    dynamic_sampling: bool = False  # drop prompts whose N rewards are all equal, draw more to fill P
    max_refills: int = 4  # extra prompt batches per step under dynamic sampling

    def __post_init__(self):
        r = self
        _need(r.prompts_per_step >= 1, f"rollout.prompts_per_step must be >= 1, got {r.prompts_per_step}.")
        _need(r.num_samples >= 1, f"rollout.num_samples must be >= 1, got {r.num_samples}.")
        _need(r.max_new_tokens >= 1, f"rollout.max_new_tokens must be >= 1, got {r.max_new_tokens}.")
        _need(r.sample_prompts >= 0,
              f"rollout.sample_prompts must be >= 0 (0 = all at once), got {r.sample_prompts}.")
        _check_sampling("rollout", r.temperature, r.top_p)
        _need(r.top_k >= 0, f"rollout.top_k must be >= 0 (0 = off), got {r.top_k}.")
        _need(0 <= r.decode_slots <= r.call_rows,
              f"rollout.decode_slots must be in [0, {r.call_rows}] (0 = lockstep; at most the rows of one sampler "
              f"call, rollout.sample_prompts x rollout.num_samples), got {r.decode_slots}.")
        _need(r.decode_layout in DECODE_LAYOUTS,
              f"rollout.decode_layout must be one of {DECODE_LAYOUTS}, got {r.decode_layout!r}.")
        _need(r.decode_mesh in ("auto", "training") or re.fullmatch(r"-?\d+,-?\d+,-?\d+", str(r.decode_mesh)),
              f"rollout.decode_mesh must be 'auto', 'training' or 'DATA,FSDP,TENSOR' sizes, got {r.decode_mesh!r}.")

    @property
    def call_rows(self) -> int:
        """Rows of one sampler call: prompts per call x samples."""
        return (self.sample_prompts or self.prompts_per_step) * self.num_samples


@dataclasses.dataclass(frozen=True)
class EvalSpec:
    """Held-out evaluation: prompts, samples per prompt, sampling settings, prompts per sampler call."""

    num_prompts: int = 64
    num_samples: int = 16  # the paper's evaluation: temperature 1.0, top-p 0.95, unbiased pass@k
    temperature: float = 1.0
    top_p: float = 0.95
    greedy: bool = True  # also one temperature-0 sample per prompt (greedy accuracy)
    sample_prompts: int = 64  # prompts per sampler call during evaluation

    def __post_init__(self):
        e = self
        _need(e.sample_prompts >= 1, f"eval.sample_prompts must be >= 1, got {e.sample_prompts}.")
        _check_sampling("eval", e.temperature, e.top_p)
        _need(e.num_samples >= 1 and e.num_prompts >= 1, "eval.num_samples and eval.num_prompts must be >= 1.")


@dataclasses.dataclass(frozen=True)
class Stage:
    """``steps`` RL steps with one ``StepConfig``."""

    steps: int
    step: StepConfig


@dataclasses.dataclass(frozen=True)
class TrainSpec:
    """Number of RL steps, eval / checkpoint / log cadence, export; ``stages``: explicit sequential stages
    (their step configs already merged over the base ``step`` section), empty for one stage of ``steps``."""

    steps: int = 40
    eval_every: int = 0  # 0 = evaluate only before and after training
    checkpoint_every: int = 10
    keep_checkpoints: int = 3
    log_every: int = 1
    stages: tuple[Stage, ...] = ()  # in a config: a sequence of {"steps": int, "step": {StepConfig overrides}}
    export_hf: bool = True  # write the final policy as a Hugging Face checkpoint
    samples_prompts: int = 4  # prompts recorded in samples/step_<N>.jsonl per evaluation (0 = none)
    samples_responses: int = 2  # responses recorded per prompt
    samples_every: int = 0  # also record an RL step's rollouts every this many steps (0 = evaluations only)
    wandb_project: str = ""  # also log metrics and samples to Weights & Biases ("" = off; needs the wandb extra)
    wandb_entity: str = ""  # "" = the account's default
    wandb_mode: str = ""  # "online" | "offline" | "disabled"; "" = wandb's own default (WANDB_MODE)

    def __post_init__(self):
        _need(self.wandb_mode in ("", "online", "offline", "disabled"),
              f"train.wandb_mode must be '', 'online', 'offline' or 'disabled', got {self.wandb_mode!r}.")
        _need(self.log_every >= 1, f"train.log_every must be >= 1, got {self.log_every}.")
        _need(self.samples_prompts >= 0 and self.samples_responses >= 1 and self.samples_every >= 0,
              f"train.samples_prompts and train.samples_every must be >= 0 and train.samples_responses >= 1, got "
              f"{self.samples_prompts}, {self.samples_every} and {self.samples_responses}.")
        _need(self.keep_checkpoints >= 1, f"train.keep_checkpoints must be >= 1, got {self.keep_checkpoints}.")
        _need(self.checkpoint_every >= 1, "train.checkpoint_every must be >= 1.")
        _need(self.eval_every >= 0, "train.eval_every must be >= 0 (0 = only before and after).")


@dataclasses.dataclass(frozen=True)
class SftSpec:
    """Supervised warm start on task demonstrations, cached under ``cache_dir``; ``seed`` -1 = the run's."""

    steps: int = 300
    batch_size: int = 64
    learning_rate: float = 3e-3
    warmup_steps: int = 20
    num_examples: int = 2000
    demos_per_example: int = 1
    cache: bool = True
    cache_dir: str = "runs/.sft_cache"
    seed: int = -1  # SFT data order / cache key; -1 = the run's seed (a study shares one)


@dataclasses.dataclass(frozen=True)
class MeshSpec:
    """Device mesh sizes over ('data', 'fsdp', 'tensor'); -1 = every remaining device."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1


def field_defaults() -> dict[str, Any]:
    """``{"section.field": default}`` for every field of the typed sections with a plain default (what a run
    uses when its config does not name the field): a workdir's config.json written before a field existed
    resumes under a config that sets it to this default."""
    sections = {f.name: f.type for f in dataclasses.fields(RunSpec)}
    out: dict[str, Any] = {}
    for name, kls in ((n, globals().get(t, t)) for n, t in sections.items()):
        if not dataclasses.is_dataclass(kls):
            continue
        for f in dataclasses.fields(kls):
            if f.default is not dataclasses.MISSING and not isinstance(f.default, Mapping):
                out[f"{name}.{f.name}"] = list(f.default) if isinstance(f.default, tuple) else f.default
    return out


@dataclasses.dataclass(frozen=True)
class RunSpec:
    seed: int
    model: ModelSpec
    task: TaskSpec
    rollout: RolloutSpec
    step: StepConfig
    train: TrainSpec
    eval: EvalSpec
    sft: SftSpec
    mesh: MeshSpec
    config_json: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        _check_finite({f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "config_json"},
                      "")  # first: NaN fails every range check below with a rule it does not break
        r = self.rollout
        _need(sum(s.steps for s in self.stages) >= 0, "train.steps must be >= 0.")
        _need(self.model.lora_rank == 0 or self.sft.steps == 0,
              f"sft.steps={self.sft.steps} with model.lora_rank={self.model.lora_rank}: the warm start trains every "
              "weight of the base, which LoRA keeps frozen; set sft.steps=0 (or warm-start a checkpoint first).")
        for i, stage in enumerate(self.stages):
            where = "step" if not self.train.stages else f"train.stages[{i}].step"
            cfg = stage.step
            _need(stage.steps >= 0, f"a stage has steps={stage.steps}; it must be >= 0.")
            try:
                cfg.validate()
            except ValueError as err:  # the step's own messages name the field without its section
                raise ValueError(f"{where}: {err}") from None
            _need(max(cfg.ks) <= r.num_samples, f"{where}.k={max(cfg.ks)} exceeds rollout.num_samples="
                  f"{r.num_samples} (k samples are drawn from the rollouts of a prompt).")
            if cfg.old_logprobs == "sampler" and (r.top_p < 1 or r.top_k > 0 or r.temperature != cfg.temperature):
                raise ValueError(f"{where}.old_logprobs='sampler' needs rollout.top_p=1, rollout.top_k=0 and "
                                 "rollout.temperature equal to step.temperature; use old_logprobs='recompute'.")
            _need(cfg.max_tokens_per_microbatch == 0 or cfg.max_tokens_per_microbatch > r.max_new_tokens,
                  f"{where}.max_tokens_per_microbatch={cfg.max_tokens_per_microbatch} is smaller than one row "
                  f"(a prompt plus rollout.max_new_tokens={r.max_new_tokens} tokens); raise it, or set 0 for the "
                  "padded micro-batch's size.")
            try:
                validate_batch(cfg, r.prompts_per_step, r.num_samples, r.prompts_per_step * r.num_samples)
            except ValueError as err:  # the step's own messages name the field without its section
                raise ValueError(f"{where}: {err}") from None

    @property
    def stages(self) -> tuple[Stage, ...]:
        """The stages the run trains: ``train.stages``, or one stage of ``train.steps`` with ``step``."""
        return self.train.stages or (Stage(self.train.steps, self.step),)

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages)

    def stage_of(self, step: int) -> int:
        """The stage that trains global step ``step`` (0-based); past the end, the last one."""
        edge = 0
        for i, stage in enumerate(self.stages):
            edge += stage.steps
            if step < edge:
                return i
        return len(self.stages) - 1

    def step_at(self, step: int) -> tuple[int, StepConfig]:
        """(stage, step configuration) of global RL step ``step`` (0-based), k-annealing resolved: the
        stage's ``k_schedule`` counts the stage's own steps."""
        stage = self.stage_of(step)
        start = sum(s.steps for s in self.stages[:stage])
        return stage, self.stages[stage].step.at(step - start)

    def check_host(self) -> RunSpec:
        """The checks that depend on this machine: the data-parallel size of the mesh over this job's
        devices, the backend an attention kernel needs, the checkpoint directory. Returns the spec."""
        import jax

        from passk_jax import parallel

        from passk_jax.sampling import decode_mesh_sizes

        r = self.rollout
        data, fsdp, _ = parallel.mesh_sizes(self.mesh.data, self.mesh.fsdp, self.mesh.tensor, jax.device_count())
        for kernel, backend in (("cudnn", "gpu"), ("splash", "tpu")):
            _need(self.model.attention != kernel or jax.default_backend() == backend,
                  f"model.attention={kernel!r} runs only on a {backend.upper()} (this backend is "
                  f"{jax.default_backend()}); use 'auto' or 'blocked'.")
        _need(bool(self.model.hf_path) or self.model.preset != "hf",
              "this config loads a Hugging Face checkpoint: set --config.model.hf_path=/path/to/model_dir.")
        _need(not self.model.hf_path or os.path.isdir(self.model.hf_path),
              f"model.hf_path {self.model.hf_path!r} is not a directory.")
        own = decode_mesh_sizes(r.decode_mesh, jax.device_count())
        if own is None:
            _need(r.decode_slots % (data * fsdp) == 0,
                  f"rollout.decode_slots={r.decode_slots} is not divisible by the data-parallel size "
                  f"data*fsdp={data * fsdp}.")
        else:
            _need(r.decode_slots % (own[0] * own[1]) == 0,
                  f"rollout.decode_mesh={r.decode_mesh!r}: rollout.decode_slots={r.decode_slots} is not divisible "
                  f"by its data x fsdp = {own[0] * own[1]}.")
        return self

    @classmethod
    def from_config(cls, config: Any, *, host_checks: bool = True) -> RunSpec:
        """The spec of an ``ml_collections`` config; ``host_checks``: also run ``check_host()``."""
        spec = cls.from_json(config.to_dict(), config_json=json.loads(config.to_json_best_effort()))
        return spec.check_host() if host_checks else spec

    @classmethod
    def from_json(cls, data: Mapping[str, Any], config_json: Mapping[str, Any] | None = None) -> RunSpec:
        """The spec of a config as nested mappings of plain values (a workdir's config.json, or a config's
        ``to_dict()``); ``config_json``: its JSON form (default: ``data``)."""
        _check_finite(data, "")  # before the sections check their ranges, which NaN fails misleadingly
        m, t = dict(data["model"]), dict(data["task"])
        scan = m.get("scan_layers", False)
        _need(str(scan).lower() in ("true", "false"), f"model.scan_layers must be true or false, got {scan!r}.")
        m["scan_layers"] = str(scan).lower() == "true"
        t["options"] = dict(t.get("options") or {})
        base = dict(data["step"])
        step = StepConfig.from_dict(base)
        stages = []
        for i, stage in enumerate(data["train"].get("stages") or ()):
            stage = dict(stage)
            unknown = sorted(set(stage) - {"steps", "step"})
            if unknown:
                raise ValueError(f"train.stages[{i}] has unknown key(s) {unknown}; use 'steps' and 'step'.")
            stages.append(Stage(int(stage["steps"]), StepConfig.from_dict({**base, **dict(stage.get("step", {}))})))
        train = {**data["train"], "stages": tuple(stages)}
        return cls(seed=int(data["seed"]), model=ModelSpec(**m), task=TaskSpec(**t),
                   rollout=RolloutSpec(**data["rollout"]), step=step, train=TrainSpec(**train),
                   eval=EvalSpec(**data["eval"]), sft=SftSpec(**data["sft"]), mesh=MeshSpec(**data["mesh"]),
                   config_json=data if config_json is None else config_json)
