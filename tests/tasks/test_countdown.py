"""Countdown: safe exact evaluation and the number-use rules."""
import time
from fractions import Fraction

import pytest

from passk_jax import tasks
from passk_jax.tasks.countdown import InvalidExpression, countdown_score, evaluate

NUMS = [3, 5, 7, 8]  # target 24


@pytest.mark.parametrize("response,reward", [
    ("(8-5)*7+3", 1.0),                              # correct, bare (compact template)
    ("<answer>(8 - 5) * 7 + 3</answer>", 1.0),       # correct, tagged
    ("<answer>3 + 7 * (8 - 5) = 24</answer>", 1.0),  # "= target" suffix allowed
    ("\\boxed{(8-5)\\times 7+3}", 1.0),              # \boxed + LaTeX times
    ("(8−5)×7+3", 0.0),                              # unicode minus is not an operator: malformed
    ("(8-5)×7+3", 1.0),                              # × accepted
    ("8*3+7-5-...", 0.0),                            # malformed
    ("(8-5)*7+4", 0.0),                              # wrong number (4 not given) and value 25
    ("8*3", 0.0),                                    # right value, numbers 5 and 7 unused
    ("8*3+7-7", 0.0),                                # 7 used twice, 5 unused
    ("(8-5)*7+3+0", 0.0),                            # extra literal 0
    ("3*8+(7-5)-2", 0.0),                            # reuse / unknown number
    ("(8-5)*7+2", 0.0),                              # wrong value
    ("7*8/(5-5)+3", 0.0),                            # division by zero
    ("3/(7-7)", 0.0),
    ("2**99999999", 0.0),                            # exponent: refused, not computed
    ("3^5", 0.0),
    ("-3+27", 0.0),                                  # unary minus not allowed
    ("", 0.0),
    ("((((3", 0.0),
    ("(" * 5000 + "3" + ")" * 5000, 0.0),            # too long / too deep, no RecursionError
    ("__import__('os').system('true')", 0.0),        # never eval'd
    ("<answer>24</answer>", 0.0),
])
def test_scoring_cases(response, reward):
    t0 = time.perf_counter()
    assert countdown_score(response, 24, NUMS) == reward
    assert time.perf_counter() - t0 < 1.0  # nothing expensive is ever computed


def test_exact_fractions():
    value, used = evaluate("(3 - 8/7) * 5 * 7 / 5")  # uses fractions mid-way
    assert value == Fraction(13) and used == [3, 8, 7, 5, 7, 5]
    assert countdown_score("8/(3-8/3)", 24, [8, 3, 8, 3]) == 1.0  # classic fraction solution
    with pytest.raises(InvalidExpression):
        evaluate("1 2")


def test_use_all_rule():
    assert countdown_score("8*3", 24, NUMS, use_all=False) == 1.0       # at most once
    assert countdown_score("8*3*1", 24, NUMS, use_all=False) == 0.0     # 1 not given
    assert countdown_score("8*3+3-3", 24, NUMS, use_all=False) == 0.0   # 3 used twice
    assert countdown_score("3*8+3-3", 24, [3, 3, 8], use_all=True) == 0.0
    assert countdown_score("(3+3)*8/2", 24, [3, 3, 8, 2]) == 1.0        # duplicates as a multiset


def test_generated_problems_solvable_and_split_disjoint():
    task = tasks.get("countdown", test_size=200)
    test = task.examples("test", 200, seed=0)
    train = task.examples("train", 1000, seed=0)
    for e in test + train:
        assert task.score(e, e.extra["solution"]) == 1.0 and task.score(e, task.demonstrations(e)[0]) == 1.0
        assert 1 <= e.ground_truth["target"] <= 999 and 3 <= len(e.ground_truth["numbers"]) <= 4
    key = lambda e: (tuple(sorted(e.ground_truth["numbers"])), e.ground_truth["target"])  # noqa: E731
    assert not {key(e) for e in test} & {key(e) for e in train}
    assert len({key(e) for e in train}) == len(train)
    assert isinstance(task.render(test[0]), str) and test[0].prompt.endswith(f">{test[0].ground_truth['target']}\n")
    instruct = tasks.get("countdown", template="instruct")
    ex = instruct.examples("test", 1)[0]
    assert ex.prompt[0]["role"] == "user" and "<answer>" in ex.prompt[0]["content"]
    assert instruct.score(ex, instruct.demonstrations(ex)[0]) == 1.0
