"""Metric writers: JSONL (one object per step), TensorBoard event files (tensorboardX), optionally Weights &
Biases (``WandbSink``), and a console line.

Only process 0 writes; other processes get a writer whose methods do nothing, so call sites need no
branches. Values are converted to plain Python floats once, here.
"""
from __future__ import annotations

import json
import math
import os
import secrets
import sys
import threading
import time
from typing import Any, Mapping

import jax
import numpy as np


_TB_IMPORT = threading.Lock()


def summary_writer_class() -> type:
    """tensorboardX's ``SummaryWriter``, imported without torch when torch is not loaded yet:
    ``tensorboardX.writer`` imports torch (1.8 s of every run's start-up here) only to accept torch tensors,
    which the run never passes (it writes Python floats). torch stays importable afterwards; a process that
    has imported torch already gets the plain import."""
    with _TB_IMPORT:
        if "torch" in sys.modules or "tensorboardX.writer" in sys.modules:
            from tensorboardX import SummaryWriter
            return SummaryWriter
        sys.modules["torch"] = None  # type: ignore[assignment] - ``import torch`` raises ImportError meanwhile
        try:
            from tensorboardX import SummaryWriter
        finally:
            del sys.modules["torch"]
        return SummaryWriter


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
    attempt wrote at or after it. ``metrics.jsonl`` rows of the previous attempt past the resume point are
    kept until this run writes the step that replaces them (``replace_after``): a resume never deletes a
    row it has not recomputed."""

    def __init__(self, workdir: str, *, tensorboard: bool = True, enabled: bool | None = None,
                 purge_step: int | None = None, wandb: WandbSink | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        self._wandb = wandb if self.enabled else None
        self._head: list[str] = []  # rows this run keeps or wrote, while stale rows remain
        self._stale: list[tuple[int, str | None, str]] = []  # (step, phase, line) of rows to replace
        if not self.enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        if tensorboard:
            self._tb = summary_writer_class()(os.path.join(workdir, "tensorboard"), purge_step=purge_step)

    def write(self, step: int, metrics: Mapping[str, Any], *, phase: str | None = None) -> dict[str, float]:
        """Append one record; ``phase`` (e.g. "final") is stored with it so a resume can replace it."""
        scalars = to_scalars(metrics)
        if not self.enabled:
            return scalars
        record: dict[str, Any] = {"step": int(step), "time": time.time()}
        if phase is not None:
            record["phase"] = phase
        record.update({k: (v if math.isfinite(v) else str(v)) for k, v in scalars.items()})
        line = json.dumps(record) + "\n"
        if self._stale:  # replace the previous attempt's row of this step (the next one of this phase), and
            # the rows of earlier steps it has passed
            same = next((r for r in self._stale if r[0] == step and r[1] == phase), None)
            self._stale = [r for r in self._stale if r[0] >= step and r is not same]
            self._head.append(line)
            _write_atomic(self.path, self._head + [r[2] for r in self._stale])
            if not self._stale:
                self._head = []
        else:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line)
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key.replace("@", "_at_"), value, int(step))
        if self._wandb is not None:
            self._wandb.log(step, scalars)
        return scalars

    def write_text(self, tag: str, text: str, step: int, *, table: tuple[list[str], list[list]] | None = None) -> None:
        """A markdown text (e.g. a samples table) to TensorBoard's text tab; ``table`` (columns, rows): the same
        as a table for Weights & Biases."""
        if self._tb is not None:
            self._tb.add_text(tag, text, int(step))
        if self._wandb is not None and table is not None:
            self._wandb.table(tag, *table, step)

    def replace_after(self, step: int, *, phases: tuple[str, ...] = ("final",)) -> None:
        """Mark the rows of steps after ``step`` and those of ``phases`` as the previous attempt's: each stays
        in the file until this run writes its step (on resume, so metrics.jsonl ends up as an uninterrupted
        run's, and an interrupted resume loses nothing)."""
        if not self.enabled or not os.path.exists(self.path):
            return
        head, stale = [], []
        with open(self.path, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    record = json.loads(line)
                    int(record["step"])
                except (ValueError, TypeError, KeyError):  # a torn or foreign line (see ``repair_jsonl``)
                    continue
                if record["step"] <= step and record.get("phase") not in phases:
                    head.append(line)
                else:
                    stale.append((int(record["step"]), record.get("phase"), line))
        self._head, self._stale = (head, stale) if stale else ([], [])

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.close()
            self._wandb = None


class WandbSink:
    """Metrics and tables of a run to Weights & Biases (the optional ``wandb`` package; ``pip install
    '.[wandb]'``). The run's id is kept in ``<workdir>/wandb_run_id``, so a resumed run continues the same
    W&B run; every row carries its training ``step`` as the x-axis (``define_metric``), so rows a resume
    recomputes are logged again rather than dropped. ``mode``: "online", "offline" (files under
    ``<workdir>/wandb/``, ``wandb sync`` later) or "disabled"; "" leaves it to wandb (``WANDB_MODE``)."""

    ID_FILE = "wandb_run_id"

    def __init__(self, workdir: str, project: str, *, entity: str = "", mode: str = "", config: dict | None = None,
                 name: str = ""):
        import wandb

        self._wandb = wandb
        id_path = os.path.join(workdir, self.ID_FILE)
        if os.path.exists(id_path):
            with open(id_path) as f:
                run_id = f.read().strip()
        else:
            run_id = secrets.token_hex(6)
            os.makedirs(workdir, exist_ok=True)
            with open(id_path, "w") as f:
                f.write(run_id + "\n")
        self.run = wandb.init(project=project, entity=entity or None, mode=mode or None, dir=workdir, id=run_id,
                              resume="allow", config=config, name=name or os.path.basename(os.path.abspath(workdir)))
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        self.run.log({**scalars, "step": int(step)})

    def table(self, tag: str, columns: list[str], rows: list[list], step: int) -> None:
        self.run.log({tag: self._wandb.Table(columns=list(columns), data=[list(r) for r in rows]), "step": int(step)})

    def close(self) -> None:
        self.run.finish()


def _write_atomic(path: str, lines: list[str]) -> None:
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(lines)
    os.replace(path + ".tmp", path)


def repair_jsonl(path: str) -> str | None:
    """Drop the lines of a JSONL file that do not parse (a torn last line from a crash or a full disk
    mid-write); returns one line saying what was dropped, or None when the file is whole or absent."""
    if not os.path.exists(path):
        return None
    with open(path, "rb") as f:
        data = f.read()
    kept, torn = [], []
    for i, raw in enumerate(data.splitlines(keepends=True), start=1):
        try:
            json.loads(raw)
            kept.append(raw if raw.endswith(b"\n") else raw + b"\n")
        except ValueError:
            if raw.strip():
                torn.append((i, len(raw)))
    if not torn and (not data or data.endswith(b"\n")):
        return None
    with open(path + ".tmp", "wb") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)
    if not torn:
        return f"{path}: added the missing newline at the end of the last row."
    lines = ", ".join(f"line {i} ({n} bytes)" for i, n in torn[:3]) + (" ..." if len(torn) > 3 else "")
    return f"{path}: dropped {len(torn)} torn row(s) left by an interrupted write: {lines}."


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
