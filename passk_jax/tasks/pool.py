"""Verifier pool: score responses in worker processes with a per-response timeout.

A verifier that raises, returns a non-finite value, hangs, or kills its process yields reward 0 and bumps
a counter (`errors`, `timeouts`); the batch completes and the pool stays usable. Rewards are always in
input order.

Design. concurrent.futures.ProcessPoolExecutor cannot stop one hung call (the only remedy is to tear
the whole executor down, losing every in-flight call) and cannot tell when a queued call actually
started, so its timeouts would include queueing and worker start-up. This pool therefore drives its own
`spawn`ed processes (safe with JAX, CUDA or threads in the parent; nothing is forked; started with
JAX_PLATFORMS=cpu and CUDA_VISIBLE_DEVICES empty), one pipe each. As with any spawn pool, the main module is
re-imported in each worker, so scripts must guard their work with `if __name__ == "__main__":`.
  * a worker announces `ready` after its imports; the scorer (e.g. a bound `task.score`) is pickled
    once per batch and loaded by a worker before its first chunk, under `startup_timeout_s`;
  * responses travel in chunks (fewer messages) but the worker reports every response as it finishes,
    and the parent restarts the clock at each report, so the timeout is per response and starts when the
    worker starts that response;
  * on a timeout only the stuck worker is killed and replaced; the response it was on scores 0, the rest
    of its chunk goes back to the queue; other workers keep going;
  * a worker that dies (segfault, OOM kill) counts an error for its current response the same way.
`num_workers=0` scores inline in the calling process (exceptions still count; no timeout).
"""
from __future__ import annotations

import importlib
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

ScoreFn = Callable[..., float]
# Workers never touch an accelerator, even if a scorer (or the re-imported main module) imports jax/torch.
_CHILD_ENV = {"JAX_PLATFORMS": "cpu", "CUDA_VISIBLE_DEVICES": ""}


def _as_reward(value: Any) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"non-finite reward {value}")
    return value


def _worker_main(conn, preload: Sequence[str]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business
    for module in preload:
        importlib.import_module(module)
    conn.send(("ready",))
    fn = None
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
                fn = pickle.loads(fn_bytes)
            except Exception as e:  # noqa: BLE001 - reported to the parent
                conn.send(("loaderror", f"{type(e).__name__}: {e}"))
                continue
            conn.send(("loaded",))
        for index, args in items:
            try:
                conn.send(("item", index, _as_reward(fn(*args)), None))
            except Exception as e:  # noqa: BLE001 - any verifier failure is a counted 0
                conn.send(("item", index, 0.0, f"{type(e).__name__}: {e}"[:500]))
        conn.send(("done",))


@dataclass
class _Worker:
    proc: Any
    conn: Any
    state: str = "starting"  # starting | idle | loading | running
    deadline: float = 0.0
    token: int = -1  # which batch's scorer it holds
    pending: deque = field(default_factory=deque)  # (index, args) sent but not yet reported


class VerifierPool:
    """`pool.score(task.score, examples, responses) -> float32[N]`; `pool.metrics()` for the counters."""

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
        self.counters = {"scored": 0, "errors": 0, "timeouts": 0, "restarts": 0}
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
        self.counters["restarts"] += 1
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

    # ------------------------------------------------------------------------------------- scoring

    def _fail(self, results: list, index: int, kind: str, message: str) -> None:
        results[index] = 0.0
        self.counters[kind] += 1
        self.last_errors.append(f"response {index}: {message}")

    def map(self, fn: ScoreFn, args: Sequence[tuple]) -> list[float]:
        """`fn(*a)` for every tuple `a`, as floats; failures and timeouts are counted zeros."""
        results: list[float | None] = [None] * len(args)
        self.counters["scored"] += len(args)
        if not args:
            return []
        if self.num_workers == 0:
            for i, a in enumerate(args):
                try:
                    results[i] = _as_reward(fn(*a))
                except Exception as e:  # noqa: BLE001
                    self._fail(results, i, "errors", f"{type(e).__name__}: {e}")
            return results
        try:
            self._run(fn, args, results)
        except BaseException:
            self.close(kill=True)  # workers may hold a half-finished batch; start clean next time
            raise
        return results

    def _run(self, fn: ScoreFn, args: Sequence[tuple], results: list) -> None:
        self._token += 1
        fn_bytes = pickle.dumps(fn)
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
                        self._handle(w, w.conn.recv(), results)
                except (EOFError, OSError):
                    self._lost(w, queue, results, "errors", "verifier process died")
                    continue
                if obj == w.proc.sentinel and not w.conn.poll():
                    self._lost(w, queue, results, "errors", "verifier process died")
            now = time.monotonic()
            for w in list(self._workers):
                if now >= w.deadline:
                    if w.state == "running":
                        self._lost(w, queue, results, "timeouts", f"timed out after {self.timeout_s}s")
                    else:
                        what = "start" if w.state == "starting" else "load the scorer"
                        raise RuntimeError(f"a verifier worker did not {what} within {self.startup_timeout_s}s.")

    def _handle(self, w: _Worker, msg: tuple, results: list) -> None:
        kind = msg[0]
        if kind == "ready":
            w.state, w.deadline = "idle", math.inf
        elif kind == "loaded":
            w.state, w.deadline = "running", time.monotonic() + self.timeout_s
        elif kind == "loaderror":
            raise RuntimeError(f"verifier workers cannot load the scorer: {msg[1]}")
        elif kind == "item":
            _, index, value, error = msg
            w.pending.popleft()
            if error is None:
                results[index] = value
            else:
                self._fail(results, index, "errors", error)
            w.deadline = time.monotonic() + self.timeout_s
        elif kind == "done":
            w.state, w.deadline = "idle", math.inf

    def _lost(self, w: _Worker, queue: deque, results: list, kind: str, message: str) -> None:
        """Kill `w`; its current response scores 0 (counted), the rest of its chunk is re-queued."""
        if w.state == "starting":
            raise RuntimeError(
                f"a verifier worker exited during start-up (exit code {w.proc.exitcode}, traceback above). "
                "Workers are spawned and re-import the main module: a script must keep its work under "
                f"`if __name__ == '__main__':`, and {self.preload} must import cleanly.")
        if w.pending:
            index, _ = w.pending.popleft()
            self._fail(results, index, kind, message)
            if w.pending:
                queue.appendleft(list(w.pending))
        self._replace(w)

    def score(self, score_fn: ScoreFn, examples: Sequence[Any], responses: Sequence[str]) -> np.ndarray:
        """Rewards f32[N] for `score_fn(examples[i], responses[i])` (e.g. `score_fn=task.score`)."""
        if len(examples) != len(responses):
            raise ValueError(f"{len(examples)} examples but {len(responses)} responses.")
        return np.asarray(self.map(score_fn, list(zip(examples, responses))), dtype=np.float32)

    def metrics(self, prefix: str = "verifier/") -> dict[str, int]:
        return {prefix + k: v for k, v in self.counters.items()}
