"""Verifiable tasks: the Task protocol, the Example record and a registry.

A task produces examples for a split, renders an example as the model's input (plain text for the
character-level CPU model, chat messages for instruct models) and scores a response with a verifier
(binary for the paper's tasks). Every example carries a `data_source` so metrics can be broken down per
source. Registered tasks:

    maze       the paper's main task (Appendix A.1): grids with S, E, * and ., answers in U/D/L/R
    countdown  reach a target with given numbers and + - * / (exact, no `eval`)
    math       final-answer extraction + math-verify; data in the verl schema (Parquet / JSONL)
    gym        any reasoning-gym dataset by name, scored with its own `score_answer`
    verl       any verl-schema file, scored per data_source or with a custom `compute_score`

Reward range. A task declares what its verifier returns: `reward_range = (lo, hi)` (default (0.0, 1.0),
the paper's binary rewards; lo < hi, both finite) and `bool_rewards` (default False: a bool is then an
invalid reward, not a silent 1/0). Every built-in task returns floats in [0, 1]; `verl` takes both as
options for custom `compute_score` functions (e.g. -1/+1 rewards). The verifier pool checks every reward
against them: anything else (out of range, non-finite, non-numeric) scores 0 and is counted as invalid.
Tasks not deriving from BaseTask may omit both; `reward_spec(task)` reads them with the defaults.

Use `get(name, **cfg)`; plug in your own with `register(name, factory)`. Heavy dependencies
(math-verify, reasoning-gym) are imported only by the tasks that need them, so verifier workers stay light.

Answers. A task that defines ``extract_answer(example, response)`` (every built-in one but ``verl``) tells
where its verifier reads the answer; responses where it finds none are counted (``verifier/<phase>/no_answer``)
and a step where more than half have none prints a WARNING with an example. ``answer`` options choose the
extraction methods of gym and math tasks (``passk_jax.tasks.answers``).
"""
from __future__ import annotations

import importlib
import numbers
from math import isfinite  # not `import math`: the submodule passk_jax.tasks.math would shadow it
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

from passk_jax.registry import Registry
from passk_jax.tasks.example import Example, Message, Prompt
from passk_jax.tasks.verl_io import load_verl

@runtime_checkable
class Task(Protocol):
    """What the trainer needs from a task. Optional attributes (see the module doc), not part of the
    structural check: `reward_range: tuple[float, float]` and `bool_rewards: bool`."""

    name: str

    def examples(self, split: str, num: int | None = None, seed: int = 0) -> list[Example]: ...

    def render(self, example: Example) -> Prompt: ...

    def score(self, example: Example, response: str) -> float: ...


class BaseTask:
    """Shared behaviour: examples come from verl-schema files when `train_files` / `test_files` are
    given, otherwise from the task's seeded `generate`. `render` returns the stored prompt."""

    name = "base"
    reward_range: tuple[float, float] = (0.0, 1.0)
    bool_rewards: bool = False

    def __init__(self, train_files: str | Sequence[str] | None = None,
                 test_files: str | Sequence[str] | None = None, on_bad_row: str = "raise"):
        self.files = {"train": train_files, "test": test_files}
        self.on_bad_row = on_bad_row

    def examples(self, split: str, num: int | None = None, seed: int = 0) -> list[Example]:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
        if self.files[split]:
            rows = load_verl(self.files[split], on_bad_row=self.on_bad_row)
            return rows if num is None else rows[:num]
        return self.generate(split, num, seed)

    def generate(self, split: str, num: int | None, seed: int) -> list[Example]:
        raise ValueError(f"task {self.name!r} has no generator; pass train_files/test_files.")

    def render(self, example: Example) -> Prompt:
        return example.prompt

    def score(self, example: Example, response: str) -> float:
        raise NotImplementedError

    def extract_answer(self, example: Example, response: str) -> str | None:
        """The answer the verifier reads in ``response`` (for samples and diagnostics; None: none found):
        by default the last <answer> block, else the last \\boxed{}."""
        answer = extract_tag(response)
        return answer if answer is not None else extract_boxed(response)


def answer_of(task: Any, example: Example, response: str) -> str | None:
    """``task.extract_answer`` where the task has one (tasks not deriving from BaseTask may not); else the
    BaseTask default."""
    fn = getattr(task, "extract_answer", None)
    return fn(example, response) if fn is not None else BaseTask.extract_answer(task, example, response)


def has_answer(task: Any, example: Example, response: str) -> bool | None:
    """Whether the task finds an answer (not None, not blank) in ``response``: its ``answer_found(example,
    response)`` when it has one, else its own ``extract_answer``; None for tasks that define neither (the
    BaseTask default only serves samples, so it decides nothing) and when the task's code raises."""
    found = getattr(task, "answer_found", None)  # a cheaper test a task may define (math: no sympy parse)
    if found is not None:
        try:
            return bool(found(example, response))
        except Exception:  # noqa: BLE001 - counting must never stop a run; the verifier counts real errors
            return None
    fn = getattr(type(task), "extract_answer", None)
    if fn is None or fn is BaseTask.extract_answer:
        return None
    try:
        answer = task.extract_answer(example, response)
    except Exception:  # noqa: BLE001 - as above
        return None
    return answer is not None and bool(str(answer).strip())


def validate_reward_range(reward_range: Any) -> tuple[float, float]:
    """`(lo, hi)` as floats; ValueError unless it is two finite numbers with lo < hi."""
    if not (isinstance(reward_range, (tuple, list)) and len(reward_range) == 2
            and all(isinstance(x, numbers.Real) for x in reward_range)):
        raise ValueError(f"reward_range must be two numbers (lo, hi), got {reward_range!r}.")
    lo, hi = float(reward_range[0]), float(reward_range[1])
    if not (isfinite(lo) and isfinite(hi) and lo < hi):
        raise ValueError(f"reward_range must be finite with lo < hi, got {reward_range!r}.")
    return lo, hi


def reward_spec(task: Any) -> tuple[tuple[float, float], bool]:
    """`((lo, hi), bool_rewards)` of a task, defaulting to ((0.0, 1.0), False) where it declares none."""
    reward_range = validate_reward_range(getattr(task, "reward_range", (0.0, 1.0)))
    return reward_range, bool(getattr(task, "bool_rewards", False))


# The task registry (`passk_jax.registry.Registry`, the idiom of estimators and losses too): each entry is
# the task's factory, a callable taking its options or a "module:attr" path to one (imported on first use,
# so a verifier worker imports only its own task's dependencies); the options and their checks are the
# factory's keyword arguments, its docs the class docstring.
_REGISTRY: Registry[str | Callable[..., Task]] = Registry("task")
for _name, _path in (("maze", "passk_jax.tasks.maze:MazeTask"), ("countdown", "passk_jax.tasks.countdown:CountdownTask"),
                     ("math", "passk_jax.tasks.math:MathTask"), ("gym", "passk_jax.tasks.gym:GymTask"),
                     ("verl", "passk_jax.tasks.verl_data:VerlTask")):
    _REGISTRY.register(_name, _path)


def register(name: str, factory: str | Callable[..., Task]) -> None:
    """Add a task (or replace one of that name): `factory` is a callable taking the task config, or a
    "module:attr" path to one."""
    _REGISTRY.register(name, factory, replace=True)


def names() -> tuple[str, ...]:
    return _REGISTRY.names()


def resolve(path: str) -> Any:
    """Import "package.module:attr"."""
    module, _, attr = path.partition(":")
    if not attr:
        raise ValueError(f"expected 'module:attr', got {path!r}.")
    return getattr(importlib.import_module(module), attr)


def get(name: str, **cfg: Any) -> Task:
    """Build a registered task: `get("maze", template="compact", train_sizes=(9, 11))`."""
    factory = _REGISTRY.lookup(name)
    return (resolve(factory) if isinstance(factory, str) else factory)(**cfg)


def extract_tag(text: str, tag: str = "answer") -> str | None:
    """Content of the LAST complete <tag>...</tag> block, stripped; None when there is none."""
    close = text.rfind(f"</{tag}>")
    if close < 0:
        return None
    open_ = text.rfind(f"<{tag}>", 0, close)
    if open_ < 0:
        return None
    return text[open_ + len(tag) + 2:close].strip()


def extract_boxed(text: str) -> str | None:
    """Content of the LAST \\boxed{...} (or \\fbox{...}) with nested braces; None when absent/unclosed."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth = 1
    for j in range(i, len(text)):
        c = text[j]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[i:j].strip()
    return None


__all__ = ["Example", "Task", "BaseTask", "Prompt", "Message", "get", "register", "names", "resolve",
           "extract_tag", "extract_boxed", "answer_of", "has_answer", "reward_spec", "validate_reward_range"]
