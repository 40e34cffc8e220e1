"""Verifier pool: raising, hanging, dying and non-finite scorers give counted zeros; the pool survives."""
import os
import time

import numpy as np
import pytest

from passk_jax import tasks
from passk_jax.tasks.pool import VerifierPool


def flaky(example, response):
    """Behaviour chosen by the response text."""
    if response == "raise":
        raise RuntimeError("verifier bug")
    if response == "hang":
        time.sleep(60)
    if response == "die":
        os._exit(3)
    if response == "nan":
        return float("nan")
    if response == "env":  # workers are kept off accelerators
        return float(os.environ.get("JAX_PLATFORMS") == "cpu" and os.environ.get("CUDA_VISIBLE_DEVICES") == "")
    return float(example) * 2


@pytest.fixture(scope="module")
def pool():
    with VerifierPool(num_workers=2, timeout_s=1.0, chunk_size=3) as p:
        yield p


def test_failures_are_counted_zeros_and_pool_stays_usable(pool):
    responses = ["ok", "raise", "ok", "hang", "ok", "nan", "ok", "ok", "die", "ok", "ok"]
    examples = list(range(1, len(responses) + 1))
    before = dict(pool.counters)
    t0 = time.monotonic()
    rewards = pool.score(flaky, examples, responses)
    elapsed = time.monotonic() - t0
    expected = [0.0 if r != "ok" else 2.0 * x for x, r in zip(examples, responses)]
    assert rewards.dtype == np.float32 and rewards.tolist() == expected
    delta = {k: pool.counters[k] - before[k] for k in before}
    assert delta == {"scored": 11, "errors": 3, "timeouts": 1, "restarts": 2}
    assert elapsed < 30  # the 60 s sleeper was cut off
    assert any("timed out" in e for e in pool.last_errors) and any("verifier bug" in e for e in pool.last_errors)
    again = pool.score(flaky, [1, 2, 3, 4, 5], ["ok", "ok", "hang", "ok", "env"])
    assert again.tolist() == [2.0, 4.0, 0.0, 8.0, 1.0]
    assert pool.metrics()["verifier/timeouts"] == before["timeouts"] + 2


def test_task_scoring_matches_inline(pool):
    task = tasks.get("maze", train_sizes=(5,), test_sizes=(5,))
    examples = task.examples("test", 20, seed=0)
    responses = [task.demonstrations(e, 1)[0] if i % 2 else "U" for i, e in enumerate(examples)]
    inline = VerifierPool(num_workers=0).score(task.score, examples, responses)
    assert pool.score(task.score, examples, responses).tolist() == inline.tolist()
    assert inline.sum() >= 10  # every demonstration verifies


def test_inline_mode_counts_errors():
    p = VerifierPool(num_workers=0)
    assert p.map(flaky, [(1, "ok"), (1, "raise"), (1, "nan")]) == [2.0, 0.0, 0.0]
    assert p.counters["errors"] == 2 and p.map(flaky, []) == []


def test_bad_arguments():
    with pytest.raises(ValueError):
        VerifierPool(num_workers=-1)
    with pytest.raises(ValueError, match="examples"):
        VerifierPool(num_workers=0).score(flaky, [1], [])


def _fail_to_load():
    raise ImportError("dependency missing in the worker")


class Unloadable:
    """Pickles fine, cannot be unpickled (like a scorer whose module is missing in workers)."""

    def __call__(self, example, response):
        return 1.0

    def __reduce__(self):
        return _fail_to_load, ()


def test_scorer_that_cannot_load_is_a_clear_error_and_pool_recovers():
    with VerifierPool(num_workers=1, timeout_s=5.0) as p:
        with pytest.raises(RuntimeError, match="cannot load the scorer.*dependency missing"):
            p.score(Unloadable(), [1, 2], ["ok", "ok"])
        assert p.score(flaky, [1, 2], ["ok", "ok"]).tolist() == [2.0, 4.0]
