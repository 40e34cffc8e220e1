"""A workdir belongs to one run: an exclusive lock, the config it was started with, and moving a run aside.

``claim(path, config_json, new_run=...)`` is the trainer's first step, before anything compiles:

* **Lock.** ``<workdir>/.lock`` is held with ``fcntl.flock`` for the life of the run, so a second process
  on the same workdir stops at once (``WorkdirError``) naming the owner (pid, host, start time) written in
  the file. The kernel drops the lock when its process dies, so a run killed with SIGKILL leaves a *stale*
  lock file that the next run takes over (and says so). The lock needs a filesystem with ``flock``
  (local disks, NFSv4); where it is unsupported the run warns and goes on unlocked.
* **Config.** A workdir's ``config.json`` describes its checkpoints. A new config that differs in
  anything but ``RESUMABLE`` fields (step count, cadences, verifier process settings) is refused with the
  differing fields named, unless ``new_run=True``, which moves every file of the old run to
  ``<workdir>/previous_runs/<UTC time>/`` (nothing is deleted) and starts afresh.
* A workdir that holds run files (checkpoints, metrics) but no ``config.json`` is refused the same way. An
  attempt that stopped before its first training step (config.json, the initial evaluation) holds no
  results: a corrected config takes the workdir, and that attempt's files move to ``previous_runs/``.
* **Results.** A resume never replaces what it cannot recompute from a checkpoint: final results newer
  than every checkpoint, or metrics rows further past the newest checkpoint than an interrupted run leaves,
  are refused in one sentence (``check_records``; ``new_run`` moves them aside instead).

``disk_full_message(err)`` turns a full disk, wherever in a storage library it surfaced, into one sentence
naming the path and the space left.

Multi-process runs: process 0 takes the lock and makes every decision; the others learn the outcome (and
its error message) through a broadcast, so all processes stop or go on together.
"""
from __future__ import annotations

import dataclasses
import datetime
import difflib
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import socket
from typing import Any, Mapping

log = logging.getLogger("passk_jax")

LOCK_NAME = ".lock"
PREVIOUS = "previous_runs"
# fields that may change between a run and its resumption: they do not change what the checkpoints hold
RESUMABLE = frozenset({
    "train.steps", "train.eval_every", "train.checkpoint_every", "train.keep_checkpoints", "train.log_every",
    "train.export_hf", "train.samples_prompts", "train.samples_responses", "train.samples_every",
    "train.wandb_project", "train.wandb_entity", "train.wandb_mode",
    "task.verifier_workers", "task.verifier_timeout_s", "task.max_error_frac",
    "task.max_failed_steps", "sft.cache", "sft.cache_dir",
    "rollout.decode_slots", "rollout.decode_layout",  # how rollouts are computed, not what they are
    "step.packing", "step.max_tokens_per_microbatch", "step.length_buckets",  # how the update is computed
})


class WorkdirError(RuntimeError):
    """The workdir cannot be used by this run (busy, another run's files, not writable)."""


# --------------------------------------------------------------------------------------------- config
def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}, "c": {}} -> {"a.b": 1}`` (an empty section has no fields)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def config_diff(old: Mapping[str, Any], new: Mapping[str, Any], ignore: frozenset[str] = RESUMABLE,
                defaults: Mapping[str, Any] | None = None) -> list[tuple[str, Any, Any]]:
    """[(dotted field, old value, new value)] for every field that differs (missing on a side: ``None``).
    A field missing on one side whose value on the other is its entry in ``defaults`` (the library's default,
    ``spec.field_defaults()``) does not differ: the config that lacks it ran with that default."""
    a, b = flatten(old), flatten(new)
    missing = object()
    defaults = defaults or {}
    diffs = []
    for name in sorted(set(a) | set(b)):
        if name in ignore:
            continue
        x, y = a.get(name, missing), b.get(name, missing)
        if (x is missing or y is missing) and name in defaults and (y if x is missing else x) == defaults[name]:
            continue
        if x != y:
            diffs.append((name, None if x is missing else x, None if y is missing else y))
    return diffs


def closest_fields(name: str, fields: list[str], n: int = 3) -> list[str]:
    """The valid dotted field names closest to a misspelt ``name``: same section by leaf name first, then
    every field by full name."""
    section, _, leaf = name.rpartition(".")
    siblings = {f.rpartition(".")[2]: f for f in fields if f.rpartition(".")[0] == section}
    close = difflib.get_close_matches(leaf, list(siblings), n=n, cutoff=0.6)
    return [siblings[c] for c in close] or difflib.get_close_matches(name, fields, n=n, cutoff=0.75)


def _describe(diffs: list[tuple[str, Any, Any]], limit: int = 6) -> str:
    shown = [f"{name} ({json.dumps(x)} -> {json.dumps(y)})" for name, x, y in diffs[:limit]]
    more = f" and {len(diffs) - limit} more" if len(diffs) > limit else ""
    return ", ".join(shown) + more


# --------------------------------------------------------------------------------------------- lock
class RunLock:
    """An exclusive ``flock`` on ``<workdir>/.lock`` holding ``pid host start-time`` of its owner."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, LOCK_NAME)
        self._fd: int | None = None

    def acquire(self) -> str | None:
        """Take the lock; returns the previous owner's line when it died holding the file (stale lock).

        Raises ``WorkdirError`` when another live process holds it."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            owner = _read(fd)
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
                raise WorkdirError(
                    f"workdir {os.path.dirname(self.path)} is in use by another run ({owner or 'owner unknown'}); "
                    "wait for it to finish or choose another --workdir.") from None
            log.warning("cannot lock %s (%s); this filesystem does not support flock, so a second run on this "
                        "workdir would not be detected.", self.path, err.strerror)
            return None
        stale = _read(fd) or None
        started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {started}\n".encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return stale

    def release(self) -> None:
        """Empty the file (a clean exit leaves no owner behind) and drop the lock."""
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            self._fd = None


def _read(fd: int) -> str:
    try:
        return os.pread(fd, 512, 0).decode(errors="replace").strip()
    except OSError:
        return ""


# --------------------------------------------------------------------------------------------- claim
def unwritable(path: str) -> str:
    """Create the directory ``path`` if needed and write a probe file there: why that fails ("" if it works)."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write_test.{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as err:
        return f"{err.strerror or err}"
    return ""


def ensure_writable(path: str) -> None:
    """Create ``path`` if needed and check a file can be written there; else one ``WorkdirError`` sentence."""
    reason = unwritable(path)
    if reason:
        raise WorkdirError(f"cannot write to workdir {path}: {reason}.")


def move_aside(path: str) -> str | None:
    """Move every entry of ``path`` except the lock and earlier moved runs into
    ``path/previous_runs/<UTC time>/``; returns that directory (None when there was nothing to move)."""
    entries = [e for e in sorted(os.listdir(path)) if e not in (LOCK_NAME, PREVIOUS)]
    if not entries:
        return None
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    dest = os.path.join(path, PREVIOUS, stamp)
    suffix = 1
    while os.path.exists(dest):
        dest = os.path.join(path, PREVIOUS, f"{stamp}.{suffix}")
        suffix += 1
    os.makedirs(dest)
    for entry in entries:
        shutil.move(os.path.join(path, entry), os.path.join(dest, entry))
    return dest


FINAL_FILES = ("eval_final.json", "report.md", "hf_export")  # written when a run finishes


@dataclasses.dataclass(frozen=True)
class Records:
    """What a workdir has recorded: the last step of ``metrics.jsonl`` (-1: no row), the step of its final
    row (None: none) and which final files exist."""

    last_step: int = -1
    final_row: int | None = None
    final_files: tuple[str, ...] = ()

    @property
    def final_step(self) -> int | None:
        """The step the final results describe: their final row's (None: no final row — the run never
        finished, or a longer run has passed an earlier finish, whose files stay until it rewrites them)."""
        return self.final_row


def recorded(path: str) -> Records:
    """The ``Records`` of a workdir (a torn or unreadable line of ``metrics.jsonl`` is skipped)."""
    last, final = -1, None
    try:
        with open(os.path.join(path, "metrics.jsonl"), encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    record = json.loads(line)
                    step = int(record["step"])
                except (ValueError, KeyError, TypeError):
                    continue
                last = max(last, step)
                if record.get("phase") == "final":
                    final = step if final is None else max(final, step)
    except FileNotFoundError:
        pass
    files = tuple(name for name in FINAL_FILES if os.path.exists(os.path.join(path, name)))
    return Records(last, final, files)


def checkpoint_steps(path: str) -> list[int]:
    """Checkpoint steps on disk, readable or not: ``checkpoints/<step>`` and the unreadable ones moved to
    ``checkpoints/corrupt/<step>[.n]`` (temporary directories of an interrupted save do not count)."""
    steps = []
    for sub in ("checkpoints", os.path.join("checkpoints", "corrupt")):
        folder = os.path.join(path, sub)
        if os.path.isdir(folder):
            steps += [int(name.split(".")[0]) for name in os.listdir(folder)
                      if re.fullmatch(r"\d+(\.\d+)?", name) and os.path.isdir(os.path.join(folder, name))]
    return sorted(steps)


def holds_results(path: str) -> bool:
    """Whether ``path`` holds a run's results: a checkpoint, a metrics row of a training step, or final
    results. A run that failed before its first training step (config.json, the initial evaluation) holds
    none, so a corrected config may take the workdir."""
    rec = recorded(path)
    return bool(checkpoint_steps(path)) or rec.last_step >= 1 or rec.final_step is not None or bool(rec.final_files)


def check_records(path: str, checkpoint_every: int) -> None:
    """Refuse a resume that would replace recorded results: final results newer than every checkpoint, or
    metrics rows further past the newest checkpoint than an interrupted run leaves (a row is written every
    step before that step's checkpoint, saved every ``checkpoint_every`` steps in the background, and a save
    waits for the previous one: a crash or a failed save leaves at most two intervals of rows past the newest
    complete checkpoint). Steps moved to ``checkpoints/corrupt/`` count as
    present: the run falls back past them on purpose and says so."""
    rec, steps = recorded(path), checkpoint_steps(path)
    newest = steps[-1] if steps else 0
    if rec.final_step is not None and rec.final_step > newest:
        what = f"final results ({', '.join(rec.final_files) or 'a final row of metrics.jsonl'}) of step {rec.final_step}"
    elif rec.last_step - newest > 2 * checkpoint_every:
        what = f"metrics.jsonl rows up to step {rec.last_step}"
    else:
        return
    where = f"its newest checkpoint is step {newest}" if steps else "it has no checkpoint"
    raise WorkdirError(
        f"workdir {path} holds {what} but {where}, so resuming would train again from step {newest} and "
        "replace them; put the checkpoints back, choose another --workdir, or pass --new_run to move this "
        "run to previous_runs/ and start a new one.")


def _checkpoint_every(*configs: Mapping[str, Any] | None) -> int:
    """The largest ``train.checkpoint_every`` of the configs (it may change between attempts)."""
    values = [int(flatten(c).get("train.checkpoint_every") or 1) for c in configs if c]
    return max(values or [1])


def check_and_prepare(path: str, config_json: Mapping[str, Any], *, new_run: bool,
                      defaults: Mapping[str, Any] | None = None) -> str | None:
    """Refuse another run's workdir (unless ``new_run``, which moves it aside) and a resume that would
    replace recorded results (``check_records``), then write ``config.json``. Files of an attempt that
    failed before its first training step under another config are moved aside, not mixed in.

    Returns a line describing what was done with old files, or None. Runs on process 0 only."""
    cfg_path = os.path.join(path, "config.json")
    old, problem = None, None
    if os.path.exists(cfg_path):
        try:
            with open(cfg_path) as f:
                old = json.load(f)
        except (OSError, ValueError) as err:
            problem = f"has an unreadable config.json ({err})"
        if old is not None and not isinstance(old, dict):
            old, problem = None, "has an unreadable config.json (not a JSON object)"
    diffs = config_diff(old, config_json, defaults=defaults) if old is not None and not new_run else None
    note = None
    if new_run:
        dest = move_aside(path)
        note = f"moved the previous run's files to {dest}" if dest else None
    elif holds_results(path):
        if old is None and problem is None:
            problem = "holds run files (checkpoints/, metrics.jsonl) but no config.json"
        elif diffs:
            problem = f"holds a run with a different config: {_describe(diffs)}"
        if problem:
            raise WorkdirError(
                f"workdir {path} {problem}; resume with the same config, choose another --workdir, or pass "
                "--new_run to move the old run to previous_runs/ and start a new one.")
        check_records(path, _checkpoint_every(old, config_json))
    elif diffs or problem or (old is None and _leftovers(path)):
        dest = move_aside(path) if _leftovers(path) else None
        note = (f"moved the files of an earlier attempt that stopped before its first training step (another "
                f"config) to {dest}") if dest else None
    with open(cfg_path + ".tmp", "w") as f:
        json.dump(dict(config_json), f, indent=2)
    os.replace(cfg_path + ".tmp", cfg_path)
    return note


def _leftovers(path: str) -> list[str]:
    """Files of an earlier attempt besides its config.json and empty folders (the lock and earlier moved
    runs excluded)."""
    out = []
    for entry in os.listdir(path):
        full = os.path.join(path, entry)
        if entry in (LOCK_NAME, PREVIOUS, "config.json") or entry.startswith(".write_test"):
            continue
        if os.path.isdir(full) and not any(files for _, _, files in os.walk(full)):
            continue
        out.append(entry)
    return out


def claim(path: str, config_json: Mapping[str, Any], *, new_run: bool = False,
          defaults: Mapping[str, Any] | None = None) -> RunLock:
    """Lock ``path`` for this run and check (or, with ``new_run``, move aside) what it holds; returns the
    lock to release at exit. Every process calls it; process 0 decides and the others follow. ``defaults``:
    see ``config_diff``."""
    import jax

    from passk_jax import parallel

    lock, error, failure = RunLock(path), "", None
    if jax.process_index() == 0:
        try:
            ensure_writable(path)
            stale = lock.acquire()
            if stale:
                log.info("workdir %s: took over the lock of a run that did not exit cleanly (%s).", path, stale)
            note = check_and_prepare(path, config_json, new_run=new_run, defaults=defaults)
            if note:
                log.info("workdir %s: %s.", path, note)
        except Exception as err:  # noqa: BLE001 - every process must learn of it, or the others wait forever
            lock.release()
            failure = err
            error = str(err) if isinstance(err, WorkdirError) else (
                disk_full_message(err) or f"cannot prepare workdir {path}: {type(err).__name__}: {err}")
    error = parallel.broadcast_text(error)
    if error:
        raise WorkdirError(error) from failure
    return lock


# --------------------------------------------------------------------------------------------- full disk
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_NO_SPACE_TEXT = re.compile(r"No space left on device|Disk quota exceeded|os_error_code='(28|122)'|\[Errno (28|122)\]")
_PATH_IN_TEXT = re.compile(r"""(?:Failed writing|Failed to write|local file|writing|file)[:\s]*["'](/[^"']+)["']|["'](/[^"']+)["']""")


def _chain(err: BaseException):
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def _nearest_existing(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def disk_full_message(err: BaseException) -> str | None:
    """One sentence for an error caused by a full disk (or quota) anywhere in its chain — an ``OSError``
    with ENOSPC / EDQUOT, or a storage library's error text saying so — naming the path being written and
    the space left on its filesystem; None for any other error."""
    path = None
    for e in _chain(err):
        if isinstance(e, OSError) and e.errno in _NO_SPACE:
            path = e.filename or path
            break
        text = str(e)
        if _NO_SPACE_TEXT.search(text):
            match = _PATH_IN_TEXT.search(text)
            path = next((g for g in match.groups() if g), None) if match else None
            break
    else:
        return None
    if path:  # name the checkpoint step, not the storage library's temporary files inside it
        path = re.sub(r"\.orbax-checkpoint-tmp.*$", "", str(path))
    where = f" while writing {path}" if path else ""
    space = ""
    if path:
        try:
            usage = shutil.disk_usage(_nearest_existing(str(path)))
            space = f" ({_size(usage.free)} free of {_size(usage.total)} on that filesystem)"
        except OSError:
            pass
    return (f"no space left on the device{where}{space}; free some space (or move the workdir) and rerun the "
            "same command: the run resumes from its last complete checkpoint.")
