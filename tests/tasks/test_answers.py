"""Answer extraction methods (``passk_jax.tasks.answers``) and the no-answer count of a rollout."""
import numpy as np
import pytest

from passk_jax import tasks
from passk_jax.tasks import answers


@pytest.mark.parametrize("text,expected", [
    ("5 - 3 = 2 in this case.", "2"),
    ("The sum is 1,234.", "1234"),
    ("we get -7", "-7"),
    ("about 0.25 or 3/4", "3/4"),
    ("x2 and v1.2.3 but 12", "12"),       # digits inside words or versions are not numbers
    ("−5 is the answer", "-5"),           # Unicode minus
    ("no digits here", None),
    ("", None),
])
def test_last_number(text, expected):
    assert answers.last_number(text) == expected


@pytest.mark.parametrize("methods,text,expected", [
    (("tag", "boxed", "last_number"), "so \\boxed{7} and <answer>8</answer>", "8"),
    (("tag", "boxed", "last_number"), "so \\boxed{7}, not 9", "7"),
    (("tag", "boxed", "last_number"), "it is 9", "9"),
    (("boxed",), "<answer>8</answer>", None),
    (("whole",), "  UDLR \n", "UDLR"),
    (("whole",), "   ", None),
])
def test_extract_tries_methods_in_order(methods, text, expected):
    assert answers.extract(text, methods) == expected


def test_parse_answer_option():
    assert answers.parse("tag, boxed,last_number") == ("tag", "boxed", "last_number")
    assert answers.parse(["whole"]) == ("whole",) and answers.parse("auto") == ("auto",)
    for bad in ("", "tag,number", ["auto", "tag"]):
        with pytest.raises(ValueError, match="task option answer="):
            answers.parse(bad)
    assert answers.is_numeric("-12") and answers.is_numeric(3) and not answers.is_numeric("3 apples")


def test_no_answer_is_counted_and_warned():
    from passk_jax.rl import rollout
    from passk_jax.run.monitor import VerifierMonitor
    from passk_jax.tasks.pool import VerifierPool

    task = tasks.get("math", answer="tag", strict_format=True)
    ex = tasks.Example("1+1?", "2", "m")
    texts = ["<answer>2</answer>", "it is 2", "two", "<answer>3</answer>"]
    said = []
    with VerifierPool(num_workers=0) as pool:
        rewards = rollout._score(pool, task, [ex] * 4, texts, "train", rollout.NO_TIMERS)
        np.testing.assert_array_equal(rewards, [1, 0, 0, 0])
        out = VerifierMonitor(pool, 0.5, 3, say=said.append).take(1)
    assert out["verifier/train/no_answer"] == 2.0 and out["verifier/train/scored"] == 4.0
    assert not said  # 2 of 4 is not more than half
    with VerifierPool(num_workers=0) as pool:
        rollout._score(pool, task, [ex] * 3, texts[1:], "eval", rollout.NO_TIMERS)
        VerifierMonitor(pool, 0.5, 3, say=said.append).take(2)
    assert len(said) == 1 and "2 of 3 responses" in said[0] and "'it is 2'" in said[0]
    # tasks without their own extract_answer (verl with a custom scorer) count nothing
    assert tasks.has_answer(tasks.get("verl"), ex, "anything") is None
