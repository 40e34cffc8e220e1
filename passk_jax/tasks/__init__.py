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

Use `get(name, **cfg)`; plug in your own with `register(name, factory)`. Heavy dependencies
(math-verify, reasoning-gym) are imported only by the tasks that need them, so verifier workers stay light.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

Message = dict[str, str]
Prompt = str | list[Message]


@dataclass
class Example:
    """One problem. `prompt`: what the model sees (text, or chat messages); `ground_truth`: what the
    verifier needs (a maze grid, a countdown spec, a final answer); `extra`: metadata (difficulty, index)."""

    prompt: Prompt
    ground_truth: Any
    data_source: str
    extra: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Task(Protocol):
    name: str

    def examples(self, split: str, num: int | None = None, seed: int = 0) -> list[Example]: ...

    def render(self, example: Example) -> Prompt: ...

    def score(self, example: Example, response: str) -> float: ...


class BaseTask:
    """Shared behaviour: examples come from verl-schema files when `train_files` / `test_files` are
    given, otherwise from the task's seeded `generate`. `render` returns the stored prompt."""

    name = "base"

    def __init__(self, train_files: str | Sequence[str] | None = None,
                 test_files: str | Sequence[str] | None = None, on_bad_row: str = "raise"):
        self.files = {"train": train_files, "test": test_files}
        self.on_bad_row = on_bad_row

    def examples(self, split: str, num: int | None = None, seed: int = 0) -> list[Example]:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
        if self.files[split]:
            from passk_jax.tasks.verl_data import load_verl

            rows = load_verl(self.files[split], on_bad_row=self.on_bad_row)
            return rows if num is None else rows[:num]
        return self.generate(split, num, seed)

    def generate(self, split: str, num: int | None, seed: int) -> list[Example]:
        raise ValueError(f"task {self.name!r} has no generator; pass train_files/test_files.")

    def render(self, example: Example) -> Prompt:
        return example.prompt

    def score(self, example: Example, response: str) -> float:
        raise NotImplementedError


_REGISTRY: dict[str, str | Callable[..., Task]] = {
    "maze": "passk_jax.tasks.maze:MazeTask",
    "countdown": "passk_jax.tasks.countdown:CountdownTask",
    "math": "passk_jax.tasks.math:MathTask",
    "gym": "passk_jax.tasks.gym:GymTask",
    "verl": "passk_jax.tasks.verl_data:VerlTask",
}


def register(name: str, factory: str | Callable[..., Task]) -> None:
    """Add a task: `factory` is a callable taking the task config, or a "module:attr" path to one."""
    _REGISTRY[name] = factory


def names() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def resolve(path: str) -> Any:
    """Import "package.module:attr"."""
    module, _, attr = path.partition(":")
    if not attr:
        raise ValueError(f"expected 'module:attr', got {path!r}.")
    return getattr(importlib.import_module(module), attr)


def get(name: str, **cfg: Any) -> Task:
    """Build a registered task: `get("maze", template="compact", train_sizes=(9, 11))`."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(names())}.")
    factory = _REGISTRY[name]
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
           "extract_tag", "extract_boxed"]
