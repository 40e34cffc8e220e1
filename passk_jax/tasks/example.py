"""The problem record every task produces and every layer passes around (no dependencies, so the verl
reader and the task registry can both build on it)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

Message = dict[str, str]
Prompt = str | list[Message]


@dataclass
class Example:
    """One problem. `prompt`: what the model sees (text, or chat messages); `ground_truth`: what the
    verifier needs (a maze grid, a countdown spec, a final answer); `extra`: metadata (difficulty, index);
    `origin`: where the example came from, e.g. 'data/train.jsonl:3' or 'data/train.parquet: row 2'; empty
    for generated examples (not part of equality)."""

    prompt: Prompt
    ground_truth: Any
    data_source: str
    extra: dict[str, Any] = field(default_factory=dict)
    origin: str = field(default="", compare=False)
