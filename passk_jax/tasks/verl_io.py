"""Datasets in the verl schema, read from and written to local Parquet or JSONL (no hub downloads); the task
that scores them is ``verl_data.VerlTask``.

One row per problem:
    data_source   str                       e.g. "maze_9x9", "openai/gsm8k"
    prompt        list of {"role", "content"} chat messages
    ability       str                       optional
    reward_model  {"style": "rule", "ground_truth": ...}
    extra_info    dict                      optional (split, index, difficulty ...)
Plain-text prompts (our compact templates) are written as one user message with
extra_info["prompt_format"] = "text" and come back as text. Malformed rows are reported with file and row
(Parquet: 0-based row index; JSONL: 1-based line number; a JSONL line that is not valid UTF-8 is such a
row); `on_bad_row="raise"` (default) fails with all of them listed, `"skip"` logs each one and keeps the
good rows. Each loaded Example's `origin` is the same location ("path:line" or "path: row i").
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Iterator, Sequence

from passk_jax.tasks.example import Example

log = logging.getLogger(__name__)


def _format_of(path: str, fmt: str | None = None) -> str:
    fmt = fmt or os.path.splitext(path)[1].lstrip(".").lower()
    if fmt in ("jsonl", "json"):
        return "jsonl"
    if fmt in ("parquet", "pq"):
        return "parquet"
    raise ValueError(f"{path}: unknown dataset format {fmt!r}; use .parquet or .jsonl.")


def _rows(path: str) -> Iterator[tuple[str, Any]]:
    """(location, row dict or an error string) for every row of a file."""
    if _format_of(path) == "parquet":
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(path).to_pylist()):
            yield f"{path}: row {i}", row
        return
    with open(path, "rb") as f:  # decoded per line, so a bad byte is reported with its line
        for i, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield f"{path}:{i}", f"invalid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})"
                continue
            if not line.strip():
                continue
            try:
                yield f"{path}:{i}", json.loads(line)
            except json.JSONDecodeError as e:
                yield f"{path}:{i}", f"invalid JSON ({e.msg})"


def row_to_example(row: Any) -> Example:
    """Validate one verl row; ValueError with the reason when it is malformed."""
    if not isinstance(row, dict):
        raise ValueError(f"row is a {type(row).__name__}, not an object")
    source = row.get("data_source")
    if not isinstance(source, str) or not source:
        raise ValueError("missing or empty 'data_source'")
    prompt = row.get("prompt")
    if isinstance(prompt, str):
        messages = None
    elif isinstance(prompt, list) and prompt:
        messages = []
        for m in prompt:
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise ValueError("'prompt' messages need string 'role' and 'content'")
            messages.append({"role": m["role"], "content": m["content"]})
    else:
        raise ValueError("'prompt' must be a non-empty list of chat messages")
    reward = row.get("reward_model")
    if not isinstance(reward, dict) or reward.get("ground_truth") is None:
        raise ValueError("missing 'reward_model.ground_truth'")
    extra = row.get("extra_info") or {}
    if not isinstance(extra, dict):
        raise ValueError("'extra_info' must be an object")
    extra = {k: v for k, v in extra.items() if v is not None}  # Parquet structs fill absent keys with null
    if messages is not None:
        text = extra.pop("prompt_format", None) == "text" and len(messages) == 1
        prompt = messages[0]["content"] if text else messages
    if row.get("ability") is not None:
        extra.setdefault("ability", row["ability"])
    return Example(prompt, reward["ground_truth"], source, extra)


def load_verl(paths: str | Sequence[str], *, on_bad_row: str = "raise",
              errors: list[str] | None = None) -> list[Example]:
    """Examples from one or more verl-schema files; bad rows raise or are skipped (see module doc)."""
    if on_bad_row not in ("raise", "skip"):
        raise ValueError(f"on_bad_row must be 'raise' or 'skip', got {on_bad_row!r}.")
    out, bad = [], []
    for path in [paths] if isinstance(paths, (str, os.PathLike)) else paths:
        path = os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"dataset file not found: {path}")
        for where, row in _rows(path):
            try:
                if isinstance(row, str):
                    raise ValueError(row)
                example = row_to_example(row)
                example.origin = where
                out.append(example)
            except ValueError as e:
                bad.append(f"{where}: {e}")
    if errors is not None:
        errors.extend(bad)
    if bad and on_bad_row == "raise":
        if len(bad) == 1:
            raise ValueError(f"malformed dataset row {bad[0]} (on_bad_row='skip' leaves such rows out).")
        shown = "\n  ".join(bad[:20]) + ("\n  ..." if len(bad) > 20 else "")
        raise ValueError(f"{len(bad)} malformed dataset row(s), the first {bad[0]}:\n  {shown}")
    for msg in bad:
        log.warning("skipping malformed dataset row: %s", msg)
    return out


def example_to_row(example: Example) -> dict[str, Any]:
    extra = dict(example.extra)
    prompt = example.prompt
    if isinstance(prompt, str):
        prompt, extra["prompt_format"] = [{"role": "user", "content": prompt}], "text"
    ability = extra.pop("ability", example.data_source.split("_")[0])
    return {"data_source": example.data_source, "prompt": prompt, "ability": ability,
            "reward_model": {"style": "rule", "ground_truth": example.ground_truth},
            "extra_info": extra}


def write_verl(examples: Sequence[Example], path: str, fmt: str | None = None) -> str:
    """Write examples as verl rows to `path` (.parquet or .jsonl, or `fmt`); returns the path."""
    rows = [example_to_row(e) for e in examples]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if _format_of(path, fmt) == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        with open(path, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path
