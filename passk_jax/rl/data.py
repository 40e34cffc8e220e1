"""The run's task and examples: the configured task, its train / test splits, and the deterministic order in
which training draws prompts (position p -> a fresh permutation per epoch, so a resume needs only p)."""
from __future__ import annotations

import numpy as np

from passk_jax.spec import RunSpec, TaskSpec
from passk_jax.tasks import Task, get as get_task, reward_spec


def make_task(spec: TaskSpec) -> Task:
    """The configured task (options set to "" or None count as unset); a wrong option is one clear error."""
    try:
        task = get_task(spec.name, **spec.set_options)
    except TypeError as err:
        raise ValueError(f"task.options do not fit task {spec.name!r}: {err}.") from err
    try:
        reward_spec(task)
    except ValueError as err:
        raise ValueError(f"task {spec.name!r}: {err}") from None
    return task


def load_examples(spec: RunSpec, task: Task) -> tuple[list, list]:
    """(train, test) examples; an empty split is one error naming its file (or the generator's size)."""
    out = []
    for split, num in (("train", spec.task.num_train), ("test", spec.eval.num_prompts)):
        examples = task.examples(split, num=num, seed=spec.seed)
        if not examples:
            source = spec.task.options.get(f"{split}_files") or None
            where = (f"task.options.{split}_files={source!r} has no rows" if source else
                     f"task {spec.task.name!r} produced no {split} examples")
            raise ValueError(f"the {split} split is empty: {where}.")
        out.append(examples)
    return out[0], out[1]


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
