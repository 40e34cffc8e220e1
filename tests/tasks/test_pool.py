"""Verifier pool: raising, hanging, dying and invalid scorers give counted zeros; the pool survives;
rewards are checked against the task's range; counters are kept per phase."""
import ast
import logging
import os
import time

import numpy as np
import pytest

from passk_jax import tasks
from passk_jax.tasks.pool import VerifierPool
from passk_jax.tasks.verl_data import VerlTask


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
    if response == "five":
        return 5.0
    if response == "str":
        return "1"
    if response == "bool":
        return True
    if response == "np":
        return np.float32(0.5)
    if response == "env":  # workers are kept off accelerators
        return float(os.environ.get("JAX_PLATFORMS") == "cpu" and os.environ.get("CUDA_VISIBLE_DEVICES") == "")
    return example / 16  # exact in float32, within [0, 1] for the examples used here


@pytest.fixture(scope="module")
def pool():
    with VerifierPool(num_workers=2, timeout_s=1.0, chunk_size=3) as p:
        yield p


def test_failures_are_counted_zeros_and_pool_stays_usable(pool):
    responses = ["ok", "raise", "ok", "hang", "ok", "nan", "ok", "ok", "die", "ok", "ok"]
    examples = list(range(1, len(responses) + 1))
    pool.take_counts()  # other tests share the pool
    before = pool.metrics()
    t0 = time.monotonic()
    rewards = pool.score(flaky, examples, responses)
    elapsed = time.monotonic() - t0
    expected = [0.0 if r != "ok" else x / 16 for x, r in zip(examples, responses)]
    assert rewards.dtype == np.float32 and rewards.tolist() == expected
    counts, examples = pool.take_counts()
    assert counts == {"train": {"scored": 11, "errors": 3, "invalid": 1, "timeouts": 1, "restarts": 2, "no_answer": 0}}
    failures = {"response 1 (error)", "response 3 (timeout)", "response 5 (invalid)", "response 8 (error)"}
    assert len(examples["train"]) == 3 and {m.split(":")[0] for m in examples["train"]} <= failures  # first 3 seen
    delta = {k: v - before[k] for k, v in pool.metrics().items()}
    assert delta == {"verifier/scored": 11, "verifier/errors": 3, "verifier/invalid": 1,
                     "verifier/timeouts": 1, "verifier/restarts": 2, "verifier/no_answer": 0}
    assert elapsed < 30  # the 60 s sleeper was cut off
    assert any("timed out" in e for e in pool.last_errors) and any("verifier bug" in e for e in pool.last_errors)
    again = pool.score(flaky, [1, 2, 3, 4, 5], ["ok", "ok", "hang", "ok", "env"])
    assert again.tolist() == [1 / 16, 2 / 16, 0.0, 4 / 16, 1.0]
    assert pool.metrics()["verifier/timeouts"] == before["verifier/timeouts"] + 2


def test_task_scoring_matches_inline(pool):
    task = tasks.get("maze", train_sizes=(5,), test_sizes=(5,))
    examples = task.examples("test", 20, seed=0)
    responses = [task.demonstrations(e, 1)[0] if i % 2 else "U" for i, e in enumerate(examples)]
    inline = VerifierPool(num_workers=0).score(task.score, examples, responses)
    assert pool.score(task.score, examples, responses).tolist() == inline.tolist()
    assert inline.sum() >= 10  # every demonstration verifies


def test_inline_mode_counts_errors():
    p = VerifierPool(num_workers=0)
    assert p.map(flaky, [(1, "ok"), (1, "raise"), (1, "nan")]) == [1 / 16, 0.0, 0.0]
    assert p.metrics()["verifier/errors"] == 2 and p.map(flaky, []) == []


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
        assert p.score(flaky, [1, 2], ["ok", "ok"]).tolist() == [1 / 16, 2 / 16]


def test_workers_check_rewards_like_inline(pool):
    responses = ["ok", "five", "str", "bool", "np", "raise"]
    inline = VerifierPool(num_workers=0)
    expected = inline.score(flaky, [1] * 6, responses, phase="eval")
    pool.take_counts()
    assert pool.score(flaky, [1] * 6, responses, phase="eval").tolist() == expected.tolist() == \
        [1 / 16, 0.0, 0.0, 0.0, 0.5, 0.0]
    counts, examples = pool.take_counts()
    assert (counts, examples) == inline.take_counts()
    assert counts == {"eval": {"scored": 6, "errors": 4, "invalid": 3, "timeouts": 0, "restarts": 0, "no_answer": 0}}
    assert examples == {"eval": [
        "response 1 (invalid): reward 5.0 outside the task's range [0.0, 1.0]; response 'five'",
        "response 2 (invalid): non-numeric reward '1' (str); response 'str'",
        "response 3 (invalid): bool reward True (this task does not declare bool_rewards); response 'bool'"]}
    assert pool.score(flaky, [1], ["bool"], allow_bool=True).tolist() == [1.0]


def returns(example, response):
    return example


INVALID = [
    (5.0, "reward 5.0 outside the task's range [0.0, 1.0]"),
    (-3.0, "reward -3.0 outside the task's range [0.0, 1.0]"),
    (2, "reward 2 outside the task's range [0.0, 1.0]"),
    (np.float64(1.5), "reward 1.5 outside the task's range [0.0, 1.0]"),
    (10 ** 400, "reward 1000000000000000000000000000000000000... outside"),
    (float("nan"), "non-finite reward nan"),
    (float("-inf"), "non-finite reward -inf"),
    (np.float32("inf"), "non-finite reward inf"),
    ("1", "non-numeric reward '1' (str)"),
    (None, "non-numeric reward None (NoneType)"),
    ([1], "non-numeric reward [1] (list)"),
    (1 + 0j, "non-numeric reward (1+0j) (complex)"),
    (np.array(0.5), "non-numeric reward array(0.5) (ndarray)"),
    (True, "bool reward True (this task does not declare bool_rewards)"),
    (np.False_, "bool reward False (this task does not declare bool_rewards)"),
]


@pytest.mark.parametrize("value, reason", INVALID, ids=[f"{type(v).__name__}{i}" for i, (v, _) in enumerate(INVALID)])
def test_invalid_rewards_score_zero_and_count(value, reason):
    p = VerifierPool(num_workers=0)
    assert p.score(returns, [value], ["x" * 200]).tolist() == [0.0]
    counts, examples = p.take_counts()
    assert counts == {"train": {"scored": 1, "errors": 1, "invalid": 1, "timeouts": 0, "restarts": 0, "no_answer": 0}}
    (message,) = p.last_errors
    assert examples == {"train": [message.removeprefix("train: ")]}
    assert message.startswith(f"train: response 0 (invalid): {reason}")
    excerpt = message.split("; response ")[-1]
    assert excerpt == repr("x" * 77 + "...") and len(ast.literal_eval(excerpt)) == 80


def test_accepted_rewards():
    p = VerifierPool(num_workers=0)
    values = [0, 1, 0.25, np.float32(0.5), np.float64(1.0), np.int64(1), np.uint8(0), np.float16(0.75)]
    assert p.score(returns, values, ["r"] * len(values)).tolist() == [0.0, 1.0, 0.25, 0.5, 1.0, 1.0, 0.0, 0.75]
    bools = [True, False, np.True_, np.False_]
    assert p.score(returns, bools, ["r"] * 4, allow_bool=True).tolist() == [1.0, 0.0, 1.0, 0.0]
    signed = p.score(returns, [-1, 1, -1.5], ["r"] * 3, reward_range=(-1, 1))
    assert signed.tolist() == [-1.0, 1.0, 0.0]  # a failure scores 0 even where the range is [-1, 1]
    assert p.metrics()["verifier/invalid"] == 1 and p.metrics()["verifier/scored"] == 15
    for bad in [(1.0, 0.0), (0.0, float("inf")), (0.0,), "01"]:
        with pytest.raises(ValueError, match="reward_range"):
            p.score(returns, [0.5], ["r"], reward_range=bad)
    with pytest.raises(ValueError, match="phase"):
        p.score(returns, [0.5], ["r"], phase="")


def test_counts_per_phase_and_take_resets(caplog):
    p = VerifierPool(num_workers=0)
    with caplog.at_level(logging.WARNING, logger="passk_jax"):
        p.score(flaky, [1] * 5, ["ok", "raise", "five", "str", "nan"], phase="train")
        p.score(flaky, [1, 1], ["ok", "five"], phase="eval")
        counts, examples = p.take_counts()
        assert counts == {"train": {"scored": 5, "errors": 4, "invalid": 3, "timeouts": 0, "restarts": 0, "no_answer": 0},
                          "eval": {"scored": 2, "errors": 1, "invalid": 1, "timeouts": 0, "restarts": 0, "no_answer": 0}}
        assert examples["train"] == [  # the first 3 of the window
            "response 1 (error): RuntimeError: verifier bug; response 'raise'",
            "response 2 (invalid): reward 5.0 outside the task's range [0.0, 1.0]; response 'five'",
            "response 3 (invalid): non-numeric reward '1' (str); response 'str'"]
        assert examples["eval"] == [
            "response 1 (invalid): reward 5.0 outside the task's range [0.0, 1.0]; response 'five'"]
        assert p.take_counts() == ({}, {})
        p.score(flaky, [1, 1], ["ok", "ok"], phase="eval")
        p.score(flaky, [1, 1], ["ok", "raise"], phase="train")
        assert p.take_counts() == ({"eval": {"scored": 2, "errors": 0, "invalid": 0, "timeouts": 0, "restarts": 0, "no_answer": 0},
                                    "train": {"scored": 2, "errors": 1, "invalid": 0, "timeouts": 0, "restarts": 0, "no_answer": 0}},
                                   {"train": ["response 1 (error): RuntimeError: verifier bug; response 'raise'"]})
    assert p.metrics() == {"verifier/scored": 11, "verifier/errors": 6, "verifier/invalid": 4,
                           "verifier/timeouts": 0, "verifier/restarts": 0, "verifier/no_answer": 0}
    logged = [r.getMessage() for r in caplog.records if r.name == "passk_jax"]
    assert len(logged) == 4  # the first 3 failures of train, the first of eval
    assert logged[0] == "verifier failure (train): response 1 (error): RuntimeError: verifier bug; response 'raise'"
    assert "later failures of this phase are counted" in logged[2] and logged[3].startswith("verifier failure (eval)")
    assert list(p.last_errors)[-1] == "train: response 1 (error): RuntimeError: verifier bug; response 'raise'"


def dict_score(data_source, solution_str, ground_truth, extra_info=None):
    return {"score": float(solution_str == ground_truth)}


def raw_score(data_source, solution_str, ground_truth, extra_info=None):
    """verl-style scorer returning whatever the response asks for."""
    return {"five": 5.0, "str": "1", "minus": -1, "dict_str": {"score": "1"}}[solution_str]


def test_verl_task_rewards_are_checked():
    ex = tasks.Example("q", "yes", "custom")
    p = VerifierPool(num_workers=0)
    task = VerlTask(score_fn=dict_score)
    assert tasks.reward_spec(task) == ((0.0, 1.0), False)
    assert task.score(ex, "yes") == 1.0 and p.score(task.score, [ex, ex], ["yes", "no"]).tolist() == [1.0, 0.0]
    task = VerlTask(score_fn=raw_score)
    assert task.score(ex, "str") == "1" and task.score(ex, "dict_str") == "1"  # passed on, not coerced
    responses = ["five", "str", "minus", "dict_str"]
    assert p.score(task.score, [ex] * 4, responses).tolist() == [0.0] * 4
    assert p.take_counts()[0]["train"]["invalid"] == 4
    signed = VerlTask(score_fn=raw_score, reward_range=[-1, 1], bool_rewards=True)
    lo_hi, allow = tasks.reward_spec(signed)
    assert (lo_hi, allow) == ((-1.0, 1.0), True)
    assert p.score(signed.score, [ex] * 4, responses, reward_range=lo_hi, allow_bool=allow).tolist() == \
        [0.0, 0.0, -1.0, 0.0]
    with pytest.raises(ValueError, match="reward_range"):
        VerlTask(reward_range=(1, 0))


def test_reward_spec_defaults():
    class Bare:  # a task not deriving from BaseTask
        name = "bare"

    assert tasks.reward_spec(Bare()) == ((0.0, 1.0), False)
    assert tasks.reward_spec(tasks.get("maze")) == ((0.0, 1.0), False)
    assert tasks.reward_spec(tasks.get("countdown")) == ((0.0, 1.0), False)
