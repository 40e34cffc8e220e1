"""The parts of a run between ``trainer.setup`` and ``trainer.finish``, kept apart:

* ``Resources``: what the run holds and ``close`` releases (config, workdir and its lock, mesh, model definition,
  rollout environment, held-out examples, data stream, checkpointer, preemption guard, metric writer, verifier
  monitor, progress bar). Frozen: setup builds it in two steps (``with_outputs`` adds the writers).
* ``Programs``: the compiled train-step functions, one ``(init_state, train_step)`` per (stage, k), built on
  first use from ``RunSpec.step_at``.
* ``LoopState``: where the run stands: the train state, RL steps done, prompts drawn, the last checkpointed
  step and whether a preemption asked it to stop. Frozen: ``trainer.rl_step`` takes one and returns the next.
* ``RunKeys``: the named random streams of the trainer, each a fixed derivation of ``spec.seed`` (the ids
  are part of what makes a resumed run equal an uninterrupted one).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax

from passk_jax import parallel
from passk_jax.models import lora
from passk_jax.models.transformer import ModelConfig
from passk_jax.rl import rollout
from passk_jax.rl.packed_step import make_packed_train_step
from passk_jax.rl.step import StepConfig, TrainState, abstract_state, make_train_step
from passk_jax.run import workdir as workdir_lib
from passk_jax.run.checkpoint import Checkpointer, PreemptionGuard
from passk_jax.run.data import DataStream
from passk_jax.run.metric_log import MetricWriter
from passk_jax.run.monitor import VerifierMonitor
from passk_jax.run.spec import RunSpec
from passk_jax.timing import NO_TIMERS, Timers


@dataclasses.dataclass(frozen=True)
class RunKeys:
    """The trainer's random streams, from ``seed``: ``train_state`` (the key the train state carries: the
    estimators' randomness), ``eval`` (every held-out evaluation: the same samples' randomness each time),
    ``rollout(step)`` (RL step ``step``'s sampling; dynamic-sampling refills fold in their index). The data
    order (``DataStream``), the warm start and a fresh model's initialisation take ``seed`` itself."""

    seed: int

    @property
    def root(self) -> jax.Array:
        return jax.random.PRNGKey(self.seed)

    @property
    def train_state(self) -> jax.Array:
        return jax.random.fold_in(self.root, 1)

    @property
    def eval(self) -> jax.Array:
        return jax.random.fold_in(self.root, 2)

    def rollout(self, step: int) -> jax.Array:
        return jax.random.fold_in(jax.random.fold_in(self.root, 3), step)

    @property
    def adapters(self) -> jax.Array:
        """Fresh LoRA adapters' initialisation (``model.lora_rank`` > 0)."""
        return jax.random.fold_in(self.root, 4)


@dataclasses.dataclass(frozen=True, eq=False)
class Resources:
    """What a run holds from ``setup`` to ``close`` (see the module docstring). ``param_shapes``: the
    parameters' ShapeDtypeStructs with their shardings, what the train steps compile for and what a checkpoint
    restores into. ``data_counts``: the prompts left out by ``task.long_prompts="skip"`` (step-0 record)."""

    spec: RunSpec
    workdir: str
    mesh: jax.sharding.Mesh
    graphdef: Any
    model_cfg: ModelConfig
    param_shapes: Any
    env: rollout.Env
    test_examples: list
    stream: DataStream
    ckpt: Checkpointer
    guard: PreemptionGuard
    lock: workdir_lib.RunLock
    timers: Timers = NO_TIMERS
    data_counts: dict[str, float] = dataclasses.field(default_factory=dict)
    base_id: dict[str, str] | None = None  # LoRA: the frozen base's path and content hash (checkpoint meta)
    writer: MetricWriter | None = None
    monitor: VerifierMonitor | None = None
    bar: Any = None

    @property
    def keys(self) -> RunKeys:
        return RunKeys(self.spec.seed)

    @property
    def is_main(self) -> bool:
        return jax.process_index() == 0

    def with_outputs(self, writer: MetricWriter, monitor: VerifierMonitor) -> Resources:
        return dataclasses.replace(self, writer=writer, monitor=monitor)

    def preempted(self) -> bool:
        """A preemption signal on any process (the same answer on every process)."""
        return parallel.process_any(self.guard.requested)

    def restore_target(self) -> dict:
        return restore_target(self.spec, self.mesh, self.param_shapes)

    def close(self) -> None:
        """Release everything: signal handlers, writers, checkpointer, verifier workers, the workdir lock."""
        self.guard.restore()
        if self.writer is not None:
            self.writer.close()
        if self.bar is not None:
            self.bar.close()
        self.ckpt.close()
        self.env.pool.close()
        self.lock.release()


class Programs:
    """The compiled train steps of a run: ``for_step(t)`` gives RL step t's ``(stage, StepConfig,
    train_step)``, building ``(init_state, train_step)`` once per (stage, k) (k-annealing compiles one step per
    distinct k)."""

    def __init__(self, spec: RunSpec, graphdef: Any, mesh: jax.sharding.Mesh, param_shapes: Any):
        self.spec, self.graphdef, self.mesh, self.param_shapes = spec, graphdef, mesh, param_shapes
        self._fns: dict[tuple[int, int], tuple] = {}

    def _fns_for(self, stage: int, cfg: StepConfig) -> tuple:
        if (stage, cfg.k) not in self._fns:
            make = make_train_step if cfg.packing == "off" else make_packed_train_step
            self._fns[stage, cfg.k] = make(self.graphdef, cfg, self.mesh, self.param_shapes)
        return self._fns[stage, cfg.k]

    def for_step(self, step: int) -> tuple[int, StepConfig, Any]:
        stage, cfg = self.spec.step_at(step)
        return stage, cfg, self._fns_for(stage, cfg)[1]

    def init_state(self, params: Any, key: jax.Array) -> TrainState:
        """A fresh train state (step 0, optimiser state zero, reference copy when a KL term needs one)."""
        return self._fns_for(0, self.spec.stages[0].step.at(0))[0](params, key)

    @property
    def compiled(self) -> tuple[tuple[int, int], ...]:
        """The (stage, k) pairs built so far."""
        return tuple(self._fns)


@dataclasses.dataclass(frozen=True)
class LoopState:
    """Where the run stands: ``state`` after ``step`` RL steps, ``position`` prompts drawn, ``saved`` the step
    of the newest checkpoint, ``stopping`` whether a preemption signal asked the loop to stop."""

    state: TrainState
    step: int = 0
    position: int = 0
    saved: int = 0
    stopping: bool = False


def checkpoint_tree(state: TrainState) -> dict:
    """The array tree a checkpoint stores for a ``TrainState`` (``ref_params`` only when there is one; with
    LoRA the adapters only: the base is the run's model, named in the checkpoint's metadata)."""
    tree = {"step": state.step, "params": lora.trainable(state.params), "opt_state": state.opt_state,
            "key": state.key}
    if state.ref_params is not None:
        tree["ref_params"] = state.ref_params
    return tree


def state_from_tree(tree: dict, params: Any) -> TrainState:
    """The ``TrainState`` of a restored tree; ``params``: the run's parameters (LoRA: supplies the base)."""
    return TrainState(tree["step"], lora.with_trainable(params, tree["params"]), tree["opt_state"], tree["key"],
                      tree.get("ref_params"))


def restore_target(spec: RunSpec, mesh: jax.sharding.Mesh, params: Any) -> dict:
    """The abstract checkpoint tree of a run (shapes, dtypes, shardings on ``mesh``) that a checkpoint
    restores into, from concrete or abstract ``params``: nothing is allocated or compiled."""
    return checkpoint_tree(abstract_state(spec.stages[0].step, mesh, params))
