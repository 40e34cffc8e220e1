"""Verifier pool: score responses in worker processes with a per-response timeout; every reward is checked.

`pool.score(task.score, examples, responses, phase="train", reward_range=(lo, hi), allow_bool=False)`
returns f32[N] in input order. Each response ends in one of four ways:
  * scored: the verifier returned a real number (int, float, numpy integer / floating scalar; a bool or
    numpy bool only with `allow_bool`, as 1.0 / 0.0) that is finite and in [lo, hi] inclusive;
  * error: the verifier raised, or its worker process died (segfault, OOM kill);
  * invalid: anything else came back (str, None, a list, complex, nan, 5.0 for a [0, 1] task, True for a
    task without `bool_rewards`); counted in both `invalid` and `errors`;
  * timeout: it ran past `timeout_s` (counted in `timeouts` only).
A failed response scores 0.0, also when 0 lies outside [lo, hi]: the batch completes, the pool stays
usable, and the counters show the failures. `num_workers=0` scores inline in the calling process with the
same checks and messages (exceptions still count; no timeout). Tasks declare their range with the
`reward_range` / `bool_rewards` attributes; `passk_jax.tasks.reward_spec(task)` reads them.

Counters are kept per phase (the `phase` string of each call, e.g. "train" or "eval"): scored, errors,
invalid, timeouts, restarts (workers replaced during that phase's batches) and no_answer (responses in
which the task found no answer: counted by the caller with `count_no_answer`). `take_counts()` returns
them for the phases scored since the previous call, with up to 3 failure messages per phase (and, under
"<phase>/no_answer", one response without an answer), and starts a new window. A message names the
response index, the kind (error, invalid, timeout), the reason and an
excerpt (at most 80 characters) of the response:
    response 5 (invalid): reward 5.0 outside the task's range [0.0, 1.0]; response 'DDRR'
The first 3 failures of each phase over the pool's lifetime are also logged as warnings on the
"passk_jax" logger, one line each. `metrics()` gives the lifetime totals summed over phases as flat
`verifier/<counter>` keys, and `last_errors` the last 20 messages (prefixed with their phase).

Design. concurrent.futures.ProcessPoolExecutor cannot stop one hung call (the only remedy is to tear
the whole executor down, losing every in-flight call) and cannot tell when a queued call actually
started, so its timeouts would include queueing and worker start-up. This pool therefore drives its own
`spawn`ed processes (safe with JAX, CUDA or threads in the parent; nothing is forked; started with
JAX_PLATFORMS=cpu and CUDA_VISIBLE_DEVICES empty), one pipe each. As with any spawn pool, the main module is
re-imported in each worker, so scripts must guard their work with `if __name__ == "__main__":`.
  * a worker announces `ready` after its imports; the scorer (e.g. a bound `task.score`) and the reward
    check are pickled once per batch and loaded by a worker before its first chunk, under
    `startup_timeout_s`; the worker checks each reward before sending it back;
  * responses travel in chunks (fewer messages) but the worker reports every response as it finishes,
    and the parent restarts the clock at each report, so the timeout is per response and starts when the
    worker starts that response;
  * on a timeout only the stuck worker is killed and replaced; the response it was on scores 0, the rest
    of its chunk goes back to the queue; other workers keep going;
  * a worker that dies counts an error for its current response the same way.
"""
from __future__ import annotations

import importlib
import logging
import math
import multiprocessing as mp
import os
import pickle
import signal
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from typing import Any, Callable, Sequence

import numpy as np

from passk_jax.tasks import validate_reward_range

ScoreFn = Callable[..., float]
RewardSpec = tuple[float, float, bool]  # lo, hi, allow_bool
# Workers never touch an accelerator, even if a scorer (or the re-imported main module) imports jax/torch.
_CHILD_ENV = {"JAX_PLATFORMS": "cpu", "CUDA_VISIBLE_DEVICES": ""}
COUNTERS = ("scored", "errors", "invalid", "timeouts", "restarts", "no_answer")
_COUNTER_OF = {"error": "errors", "invalid": "invalid", "timeout": "timeouts"}
_EXAMPLES, _LOGGED, _EXCERPT = 3, 3, 80
log = logging.getLogger("passk_jax")


class _InvalidReward(ValueError):
    pass


def _outside(value: Any, lo: float, hi: float) -> _InvalidReward:
    shown = str(value) if len(str(value)) <= 40 else str(value)[:37] + "..."
    return _InvalidReward(f"reward {shown} outside the task's range [{lo}, {hi}]")


def _check_reward(value: Any, lo: float, hi: float, allow_bool: bool = False) -> float:
    """`value` as a float when it is an acceptable reward, else `_InvalidReward` saying why."""
    if isinstance(value, (bool, np.bool_)):
        if not allow_bool:
            raise _InvalidReward(f"bool reward {value} (this task does not declare bool_rewards)")
        value = float(value)
    elif isinstance(value, (int, np.integer)):
        if not lo <= value <= hi:  # exact comparison first: a huge int does not fit a float
            raise _outside(value, lo, hi)
        value = float(value)
    elif isinstance(value, (float, np.floating)):
        value = float(value)
        if not math.isfinite(value):
            raise _InvalidReward(f"non-finite reward {value}")
    else:
        raise _InvalidReward(f"non-numeric reward {repr(value)[:60]} ({type(value).__name__})")
    if not lo <= value <= hi:
        raise _outside(value, lo, hi)
    return value


def _score_one(fn: ScoreFn, args: tuple, spec: RewardSpec) -> tuple[float, str | None, str | None]:
    """(reward, None, None), or (0.0, kind, reason) with kind "error" (raised) or "invalid"."""
    try:
        value = fn(*args)
    except Exception as e:  # noqa: BLE001 - any verifier failure is a counted 0
        return 0.0, "error", f"{type(e).__name__}: {e}"[:500]
    try:
        return _check_reward(value, *spec), None, None
    except _InvalidReward as e:
        return 0.0, "invalid", str(e)[:500]
    except Exception as e:  # noqa: BLE001 - e.g. a returned object whose repr raises
        return 0.0, "invalid", f"unreadable reward of type {type(value).__name__} ({type(e).__name__})"


def _worker_main(conn, preload: Sequence[str]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business
    for module in preload:
        importlib.import_module(module)
    conn.send(("ready",))
    fn = spec = None
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg[0] == "stop":
            return
        _, fn_bytes, items = msg
        if fn_bytes is not None:
            try:
                fn, spec = pickle.loads(fn_bytes)
            except Exception as e:  # noqa: BLE001 - reported to the parent
                conn.send(("loaderror", f"{type(e).__name__}: {e}"))
                continue
            conn.send(("loaded",))
        for index, args in items:
            conn.send(("item", index, *_score_one(fn, args, spec)))
        conn.send(("done",))


@dataclass
class _Worker:
    proc: Any
    conn: Any
    state: str = "starting"  # starting | idle | loading | running
    deadline: float = 0.0
    token: int = -1  # which batch's scorer it holds
    pending: deque = field(default_factory=deque)  # (index, args) sent but not yet reported


@dataclass
class _Batch:
    args: Sequence[tuple]
    phase: str
    results: list


def _excerpt(text: str) -> str:
    return repr(text if len(text) <= _EXCERPT else text[:_EXCERPT - 3] + "...")


class VerifierPool:
    """`pool.score(task.score, examples, responses, phase=...) -> float32[N]`; `take_counts()` for the
    per-phase counters and first failures since the last call, `metrics()` for the lifetime totals."""

    def __init__(self, num_workers: int = 2, timeout_s: float = 10.0, *, startup_timeout_s: float = 120.0,
                 chunk_size: int | None = None, preload: Sequence[str] = ("passk_jax.tasks",),
                 start_method: str = "spawn"):
        if num_workers < 0 or timeout_s <= 0:
            raise ValueError("num_workers must be >= 0 and timeout_s > 0.")
        self.num_workers, self.timeout_s, self.startup_timeout_s = num_workers, timeout_s, startup_timeout_s
        self.chunk_size, self.preload = chunk_size, tuple(preload)
        self._ctx = mp.get_context(start_method)
        self._workers: list[_Worker] = []
        self._token = 0
        self._window: dict[str, dict[str, int]] = {}  # per phase, since the last take_counts()
        self._totals: dict[str, dict[str, int]] = {}  # per phase, lifetime
        self._examples: dict[str, list[str]] = {}  # first failure messages per phase, same window
        self._logged: dict[str, int] = {}  # failures logged per phase, lifetime
        self.last_errors: deque[str] = deque(maxlen=20)

    # ----------------------------------------------------------------------------------- processes

    def _spawn(self) -> _Worker:
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(target=_worker_main, args=(child, self.preload), daemon=True,
                                 name="passk-verifier")
        saved = {k: os.environ.get(k) for k in _CHILD_ENV}
        os.environ.update(_CHILD_ENV)  # the child's environment is copied at start
        try:
            proc.start()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k)
                else:
                    os.environ[k] = v
        child.close()
        return _Worker(proc, parent, deadline=time.monotonic() + self.startup_timeout_s)

    def _replace(self, w: _Worker) -> _Worker:
        w.proc.kill()
        w.proc.join(5)
        w.conn.close()
        new = self._spawn()
        self._workers[self._workers.index(w)] = new
        return new

    def close(self, kill: bool = False) -> None:
        """Stop the workers (politely, or at once with `kill`); the next batch starts fresh ones."""
        for w in self._workers:
            try:
                w.conn.send(("stop",))
            except OSError:
                pass
        for w in self._workers:
            w.proc.join(0 if kill else 2)
            if w.proc.is_alive():
                w.proc.kill()
                w.proc.join(2)
            w.conn.close()
        self._workers = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    # ------------------------------------------------------------------------------------ counters

    def _count(self, phase: str, counter: str, n: int = 1) -> None:
        for table in (self._window, self._totals):
            table.setdefault(phase, dict.fromkeys(COUNTERS, 0))[counter] += n

    def _fail(self, batch: _Batch, index: int, kind: str, reason: str) -> None:
        batch.results[index] = 0.0
        self._count(batch.phase, _COUNTER_OF[kind])
        if kind == "invalid":
            self._count(batch.phase, "errors")
        message = f"response {index} ({kind}): {' '.join(reason.split())}"
        text = batch.args[index][-1] if batch.args[index] else None
        if isinstance(text, str):
            message += f"; response {_excerpt(text)}"
        examples = self._examples.setdefault(batch.phase, [])
        if len(examples) < _EXAMPLES:
            examples.append(message)
        self.last_errors.append(f"{batch.phase}: {message}")
        logged = self._logged.get(batch.phase, 0)
        if logged < _LOGGED:
            self._logged[batch.phase] = logged + 1
            more = " (later failures of this phase are counted, not logged)" if logged + 1 == _LOGGED else ""
            log.warning("verifier failure (%s): %s%s", batch.phase, message, more)

    def count_no_answer(self, phase: str, n: int, example: str | None = None) -> None:
        """Count ``n`` responses of ``phase`` in which the task found no answer; ``example``: one of them."""
        if n:
            self._count(phase, "no_answer", n)
            if example is not None:
                self._examples.setdefault(f"{phase}/no_answer", [f"response {_excerpt(example)}"])

    def take_counts(self) -> tuple[dict[str, dict[str, int]], dict[str, list[str]]]:
        """`(counts, examples)` for the phases scored since the previous call, then a new window:
        counts {phase: {counter: n}}, examples {phase: up to 3 failure messages} (failed phases only) and
        {"<phase>/no_answer": [one response without an answer]}."""
        taken, self._window, self._examples = (self._window, self._examples), {}, {}
        return taken

    def metrics(self, prefix: str = "verifier/") -> dict[str, int]:
        """Lifetime counters summed over phases: {prefix + counter: n}."""
        return {prefix + k: sum(c[k] for c in self._totals.values()) for k in COUNTERS}

    # ------------------------------------------------------------------------------------- scoring

    def map(self, fn: ScoreFn, args: Sequence[tuple], *, phase: str = "train",
            reward_range: tuple[float, float] = (0.0, 1.0), allow_bool: bool = False) -> list[float]:
        """`fn(*a)` for every tuple `a`, as checked floats; failures are counted zeros. Messages quote
        the last argument when it is a string (the response, for `score`)."""
        if not isinstance(phase, str) or not phase:
            raise ValueError(f"phase must be a non-empty string, got {phase!r}.")
        spec = (*validate_reward_range(reward_range), bool(allow_bool))
        batch = _Batch(args, phase, [None] * len(args))
        self._count(phase, "scored", len(args))
        if not args:
            return []
        if self.num_workers == 0:
            for i, a in enumerate(args):
                value, kind, reason = _score_one(fn, a, spec)
                if kind is None:
                    batch.results[i] = value
                else:
                    self._fail(batch, i, kind, reason)
            return batch.results
        try:
            self._run(fn, spec, batch)
        except BaseException:
            self.close(kill=True)  # workers may hold a half-finished batch; start clean next time
            raise
        return batch.results

    def _run(self, fn: ScoreFn, spec: RewardSpec, batch: _Batch) -> None:
        self._token += 1
        fn_bytes = pickle.dumps((fn, spec))
        args = batch.args
        size = self.chunk_size or max(1, min(64, math.ceil(len(args) / (4 * self.num_workers))))
        queue = deque(list(enumerate(args))[i:i + size] for i in range(0, len(args), size))
        while len(self._workers) < self.num_workers:
            self._workers.append(self._spawn())
        while queue or any(w.state in ("loading", "running") for w in self._workers):
            for w in self._workers:  # hand out work
                if w.state == "idle" and queue:
                    chunk = queue.popleft()
                    fresh = w.token != self._token
                    w.conn.send(("run", fn_bytes if fresh else None, chunk))
                    w.pending = deque(chunk)
                    w.token = self._token
                    w.state = "loading" if fresh else "running"
                    w.deadline = time.monotonic() + (self.startup_timeout_s if fresh else self.timeout_s)
            by_conn = {w.conn: w for w in self._workers}
            by_sentinel = {w.proc.sentinel: w for w in self._workers}
            deadline = min(w.deadline for w in self._workers)
            timeout = None if deadline == math.inf else max(0.0, deadline - time.monotonic())
            ready = wait(list(by_conn) + list(by_sentinel), timeout)
            for obj in ready:
                w = by_conn.get(obj) or by_sentinel.get(obj)
                if w not in self._workers:
                    continue  # replaced earlier in this round
                try:
                    while w.conn.poll():
                        self._handle(w, w.conn.recv(), batch)
                except (EOFError, OSError):
                    self._lost(w, queue, batch, "error", "verifier process died")
                    continue
                if obj == w.proc.sentinel and not w.conn.poll():
                    self._lost(w, queue, batch, "error", "verifier process died")
            now = time.monotonic()
            for w in list(self._workers):
                if now >= w.deadline:
                    if w.state == "running":
                        self._lost(w, queue, batch, "timeout", f"timed out after {self.timeout_s}s")
                    else:
                        what = "start" if w.state == "starting" else "load the scorer"
                        raise RuntimeError(f"a verifier worker did not {what} within {self.startup_timeout_s}s.")

    def _handle(self, w: _Worker, msg: tuple, batch: _Batch) -> None:
        kind = msg[0]
        if kind == "ready":
            w.state, w.deadline = "idle", math.inf
        elif kind == "loaded":
            w.state, w.deadline = "running", time.monotonic() + self.timeout_s
        elif kind == "loaderror":
            raise RuntimeError(f"verifier workers cannot load the scorer: {msg[1]}")
        elif kind == "item":
            _, index, value, error, reason = msg
            w.pending.popleft()
            if error is None:
                batch.results[index] = value
            else:
                self._fail(batch, index, error, reason)
            w.deadline = time.monotonic() + self.timeout_s
        elif kind == "done":
            w.state, w.deadline = "idle", math.inf

    def _lost(self, w: _Worker, queue: deque, batch: _Batch, kind: str, reason: str) -> None:
        """Kill `w`; its current response scores 0 (counted), the rest of its chunk is re-queued."""
        if w.state == "starting":
            raise RuntimeError(
                f"a verifier worker exited during start-up (exit code {w.proc.exitcode}, traceback above). "
                "Workers are spawned and re-import the main module: a script must keep its work under "
                f"`if __name__ == '__main__':`, and {self.preload} must import cleanly.")
        if w.pending:
            index, _ = w.pending.popleft()
            self._fail(batch, index, kind, reason)
            if w.pending:
                queue.appendleft(list(w.pending))
        self._count(batch.phase, "restarts")
        self._replace(w)

    def score(self, score_fn: ScoreFn, examples: Sequence[Any], responses: Sequence[str], *,
              phase: str = "train", reward_range: tuple[float, float] = (0.0, 1.0),
              allow_bool: bool = False) -> np.ndarray:
        """Rewards f32[N] for `score_fn(examples[i], responses[i])` (e.g. `score_fn=task.score`, with
        `reward_range, allow_bool = reward_spec(task)`), counted under `phase`."""
        if len(examples) != len(responses):
            raise ValueError(f"{len(examples)} examples but {len(responses)} responses.")
        rewards = self.map(score_fn, list(zip(examples, responses)), phase=phase, reward_range=reward_range,
                           allow_bool=allow_bool)
        return np.asarray(rewards, dtype=np.float32)
