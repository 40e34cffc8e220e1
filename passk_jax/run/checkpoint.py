"""Orbax checkpointing: train state + JSON metadata (data position, RNG, config), keep-N, async, resume.

A checkpoint step directory holds two items:
  ``state``  the array pytree (params, optimizer state, step, RNG key data), restored with the shardings of
             an abstract target so a run resumes on any mesh;
  ``meta``   JSON: data position, resolved config, anything small the loop needs to continue exactly.
Orbax writes each step to a temporary directory and renames it when complete, so a crash mid-save leaves
no step behind. A step that exists but cannot be read (truncated files, bad JSON) is reported in one line
and moved to ``corrupt/`` inside the checkpoint directory: ``restore_latest`` falls back to the newest step
that does load, and the resumed run can save the moved step's number again.

Multi-process runs: every process calls ``save`` / ``restore`` / ``wait`` with the same arguments (Orbax
writes each array's shards from the processes that hold them and lets the primary process finalise the
step); ``restore_latest`` skips a step on every process when any process fails to read it.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp

from passk_jax import parallel

log = logging.getLogger("passk_jax")
CORRUPT = "corrupt"  # unreadable steps are moved here


def _single_writer_arrays() -> None:
    """On CPU devices, save each array from one replica (Orbax's ``use_replica_parallel=False``). Orbax's
    default on CPU and TPU splits every replicated array into one slice per replica, each an eagerly
    dispatched ``lax.slice``, so that replicas share the writing; on CPU devices the copy to host is a
    memcpy, and those dispatches were 3 of the 24 s of a tiny run (336 slices per save on 8 virtual
    devices). Orbax turns it off itself when ``JAX_PLATFORMS`` names a GPU; TPU keeps its default."""
    current = ocp.type_handlers.get_type_handler(jax.Array)
    if getattr(current, "_use_replica_parallel", False) and all(d.platform == "cpu" for d in jax.devices()):
        with _quiet("absl"):  # Orbax warns that the registration overrides its default handler
            ocp.type_handlers.register_type_handler(jax.Array, ocp.type_handlers.ArrayHandler(
                use_replica_parallel=False,  # the rest as Orbax's default handler, its array-metadata store too
                primary_host=getattr(current, "_primary_host", 0), replica_id=getattr(current, "_replica_id", 0),
                array_metadata_store=getattr(current, "_array_metadata_store", None)), override=True)


class Checkpointer:
    """Thin wrapper over ``ocp.CheckpointManager`` with corrupt-step fallback."""

    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
        _single_writer_arrays()
        self.directory = os.path.abspath(directory)
        os.makedirs(self.directory, exist_ok=True)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
        )
        with _quiet("absl"):  # it reads every step's metadata: a corrupt one is reported by restore_latest
            self._manager = ocp.CheckpointManager(self.directory, item_names=("state", "meta"), options=options)

    def steps(self) -> list[int]:
        """Completed checkpoint steps, oldest first."""
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, meta: dict, *, force: bool = True) -> None:
        """Save ``state`` (array pytree) and ``meta`` (JSON-able dict) at ``step`` (async unless disabled)."""
        self._manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            force=force,
        )

    def wait(self) -> None:
        """Block until pending asynchronous saves are on disk."""
        self._manager.wait_until_finished()

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """Restore one step onto the shardings/dtypes of ``abstract_state`` (ShapeDtypeStructs or arrays)."""
        target = jax.tree.map(_abstract, abstract_state)
        out = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()
            ),
        )
        return out["state"], dict(out["meta"])

    def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict] | None:
        """Newest readable checkpoint as (step, state, meta).

        An unreadable step is moved to ``<directory>/corrupt/<step>`` (never deleted) with one warning
        line, so the resumed run can save that step again; then the previous step is tried."""
        with _quiet("absl"):  # orbax logs each failed read at ERROR; its errors can run to pages
            return self._restore_latest(abstract_state)

    def _restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict] | None:
        for step in reversed(self.steps()):
            try:
                state, meta = self.restore(step, abstract_state)
                failure = None
            except Exception as err:  # noqa: BLE001 - any read failure means "this step is unusable"
                failure = _one_line(err)
            if parallel.process_any(failure is not None):  # all processes resume from the same step
                moved = self._quarantine(step)
                log.warning("checkpoint step %d in %s is unreadable (%s); moved it to %s and trying the "
                            "previous one.", step, self.directory, failure or "on another process", moved)
                continue
            return step, state, meta
        return None

    def _quarantine(self, step: int) -> str:
        """Move step directory ``step`` to ``corrupt/`` (process 0; every process waits for it)."""
        src = os.path.join(self.directory, str(step))
        dest = os.path.join(self.directory, CORRUPT, str(step))
        if jax.process_index() == 0:
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            suffix = 1
            while os.path.exists(dest):
                dest = os.path.join(self.directory, CORRUPT, f"{step}.{suffix}")
                suffix += 1
            os.replace(src, dest)
        dest = parallel.broadcast_text(dest)
        self._manager.reload()
        return dest

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


@contextlib.contextmanager
def _quiet(name: str):
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _one_line(err: BaseException, limit: int = 200) -> str:
    """``Type: first line of the message`` cut to ``limit`` characters (storage errors can be pages long)."""
    lines = str(err).strip().splitlines()
    text = f"{type(err).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _abstract(x: Any) -> Any:
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    sharding = getattr(x, "sharding", None)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


class PreemptionGuard:
    """Turns SIGTERM / SIGINT into a flag the training loop polls, so it can checkpoint and exit cleanly.

    A second signal while the flag is set restores the previous handler and re-raises it (force quit).
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)):
        self._event = threading.Event()
        self._previous: dict[int, Callable | int | None] = {}
        self.signal_name: str | None = None
        if threading.current_thread() is threading.main_thread():
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):  # noqa: ARG002
        if self._event.is_set():
            self.restore()
            signal.raise_signal(signum)
            return
        self.signal_name = signal.Signals(signum).name
        self._event.set()

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
