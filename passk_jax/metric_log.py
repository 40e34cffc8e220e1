"""Metric writers: JSONL (one object per step), TensorBoard event files (tensorboardX) and a console line.

Only process 0 writes; other processes get a writer whose methods do nothing, so call sites need no
branches. Values are converted to plain Python floats once, here.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Mapping

import jax
import numpy as np


def _scalar(v: Any) -> float | None:
    try:
        arr = np.asarray(v)
    except Exception:  # noqa: BLE001 - skip non-numeric values silently: they are not metrics
        return None
    if arr.size != 1 or not np.issubdtype(arr.dtype, np.number) and arr.dtype != np.bool_:
        return None
    return float(arr.reshape(()))


def to_scalars(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Flatten nested metric dicts ``{"a": {"b": 1}} -> {"a/b": 1.0}``; non-scalars are dropped."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(to_scalars(value, prefix=name + "/"))
            continue
        scalar = _scalar(value)
        if scalar is not None:
            out[name] = scalar
    return out


class MetricWriter:
    """Appends ``{"step": s, **metrics}`` to ``metrics.jsonl`` and writes TensorBoard scalars.

    ``purge_step``: a resumed run passes its first new step, so TensorBoard drops events the previous
    attempt wrote at or after it (``metrics.jsonl`` is cut by ``truncate_after``)."""

    def __init__(self, workdir: str, *, tensorboard: bool = True, enabled: bool | None = None,
                 purge_step: int | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if not self.enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=purge_step)

    def write(self, step: int, metrics: Mapping[str, Any], *, phase: str | None = None) -> dict[str, float]:
        """Append one record; ``phase`` (e.g. "final") is stored with it so a resume can drop it."""
        scalars = to_scalars(metrics)
        if not self.enabled:
            return scalars
        record: dict[str, Any] = {"step": int(step), "time": time.time()}
        if phase is not None:
            record["phase"] = phase
        record.update({k: (v if math.isfinite(v) else str(v)) for k, v in scalars.items()})
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key.replace("@", "_at_"), value, int(step))
        return scalars

    def truncate_after(self, step: int, *, drop_phases: tuple[str, ...] = ("final",)) -> None:
        """Drop records with step > ``step`` and those of ``drop_phases`` (on resume, so metrics.jsonl matches
        an uninterrupted run: the final evaluation is redone when the resumed run finishes). A torn last
        line (a crash mid-write) is dropped too."""
        if not self.enabled or not os.path.exists(self.path):
            return
        kept = []
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if record["step"] <= step and record.get("phase") not in drop_phases:
                    kept.append(line if line.endswith("\n") else line + "\n")
        with open(self.path + ".tmp", "w", encoding="utf-8") as f:
            f.writelines(kept)
        os.replace(self.path + ".tmp", self.path)

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_jsonl(path: str) -> list[dict]:
    """All records of a metrics.jsonl file."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def console_line(step: int, total: int, scalars: Mapping[str, float], keys: Mapping[str, str]) -> str:
    """``step 12/200 | reward 0.41 | ...`` with the chosen ``{metric_name: label}`` pairs that exist."""
    parts = [f"step {step}/{total}"]
    for key, label in keys.items():
        if key in scalars:
            value = scalars[key]
            parts.append(f"{label} {value:.3g}" if abs(value) < 1e4 else f"{label} {value:.0f}")
    return " | ".join(parts)
