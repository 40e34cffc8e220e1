"""The base config every named config starts from: the CPU default (tiny model, mazes, Pass@k analytical).

Every field and its default is written once, in the typed spec (``passk_jax.run.spec``: ModelSpec,
TaskSpec, RolloutSpec, TrainSpec, EvalSpec, SftSpec, MeshSpec, and ``passk_jax.rl.step.StepConfig``, where
each field's comment says what it means); ``section`` turns a spec dataclass into a ConfigDict with every
field at its default, so each can be set with ``--config.SECTION.FIELD=value`` (ml_collections' type
checks and the "did you mean" sentence included). This file only states where the CPU default run
departs from the library's defaults (``CPU_OVERRIDES``, tested).

Sections:
  model     preset ("tiny" | "small") for a fresh character-level model, or hf_path for a local checkpoint
  task      registry name + options for ``passk_jax.tasks.get``
  rollout   prompts per step, samples per prompt (N_rollout), sampling settings, dynamic sampling
  step      the update: estimator, k (and k_schedule), clip, aggregation, optimiser, packing, ...
  train     number of RL steps, eval / checkpoint / log cadence, sequential stages
  eval      held-out evaluation (paper: temperature 1.0, top-p 0.95, unbiased pass@k for k = 1, 2, 4, ...)
  sft       supervised warm start on task demonstrations (cached across runs)
  mesh      device mesh sizes over ('data', 'fsdp', 'tensor'); -1 = all remaining devices
"""
import dataclasses
import typing
from collections.abc import Mapping

from ml_collections import ConfigDict, config_dict

from passk_jax.rl.step import StepConfig
from passk_jax.run.spec import EvalSpec, MeshSpec, ModelSpec, RolloutSpec, SftSpec, TaskSpec, TrainSpec

SECTIONS = {"model": ModelSpec, "task": TaskSpec, "rollout": RolloutSpec, "step": StepConfig,
            "train": TrainSpec, "eval": EvalSpec, "sft": SftSpec, "mesh": MeshSpec}

# The CPU default run: a tiny character-level model learning 5x5 mazes with Pass@k analytical (k = 4),
# at a learning rate for 1M parameters, trained on the sampler's own log-probabilities.
CPU_OVERRIDES = {
    "task.options": {"template": "compact", "train_sizes": (5,), "test_sizes": (5,)},
    "step.estimator": "passk_analytic",
    "step.k": 4,
    "step.learning_rate": 1e-4,
    "step.warmup_steps": 5,
    "step.weight_decay": 0.0,
    "step.old_logprobs": "sampler",
}


def section(cls: type, **values) -> ConfigDict:
    """Every field of the spec dataclass ``cls``, at ``values`` or else its default; a field whose default is
    None takes a value of its declared type (a placeholder), a mapping becomes a ConfigDict."""
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ValueError(f"section: {unknown} are not {cls.__name__} fields.")
    out = {}
    for f in dataclasses.fields(cls):
        value = values.get(f.name, f.default if f.default is not dataclasses.MISSING else f.default_factory())
        if isinstance(value, Mapping):
            value = ConfigDict(dict(value))
        elif value is None:
            value = config_dict.placeholder(next(t for t in typing.get_args(hints[f.name]) if t is not type(None)))
        out[f.name] = value
    return ConfigDict(out)


def step_section(**values) -> ConfigDict:
    """``section(StepConfig, **values)``."""
    return section(StepConfig, **values)


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.seed = 0
    for name, cls in SECTIONS.items():
        c[name] = section(cls)
    for dotted, value in CPU_OVERRIDES.items():
        name, field = dotted.split(".")
        c[name][field] = ConfigDict(value) if isinstance(value, Mapping) else value
    return c
