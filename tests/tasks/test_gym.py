"""reasoning-gym adapter end to end: generate, render, score (inline and in the verifier pool), files."""
import pytest

from passk_jax import tasks
from passk_jax.tasks.pool import VerifierPool
from passk_jax.tasks.verl_data import write_verl


def test_reasoning_gym_end_to_end(tmp_path):
    task = tasks.get("gym", dataset="basic_arithmetic", test_size=20)
    test = task.examples("test", seed=0)
    train = task.examples("train", 30, seed=0)
    assert len(test) == 20 and len(train) == 30
    assert not {e.prompt[1]["content"] for e in test} & {e.prompt[1]["content"] for e in train}
    assert train == task.examples("train", 30, seed=0)  # seeded
    ex = test[0]
    system, user = task.render(ex)
    assert system["role"] == "system" and "<answer>" in system["content"] and user["role"] == "user"
    assert ex.data_source == "gym_basic_arithmetic"
    responses = [f"Let me compute.\n<answer>{e.ground_truth}</answer>" for e in test[:5]]
    responses += ["<answer>not a number</answer>", "no tags: the result is " + test[6].ground_truth + "."]
    examples = test[:7]
    inline = [task.score(e, r) for e, r in zip(examples, responses)]
    assert inline == [1.0] * 5 + [0.0, 1.0]  # numeric answers: tags, else boxed, else the last number
    tags_only = tasks.get("gym", dataset="basic_arithmetic", test_size=20, answer="tag")
    assert tags_only.score(test[6], responses[6]) == 0.0 and tags_only.extract_answer(test[6], responses[6]) is None
    with VerifierPool(num_workers=1, timeout_s=30) as pool:
        assert pool.score(task.score, examples, responses).tolist() == inline
    # compact template takes an untagged response whole; examples survive a verl file round trip
    compact = tasks.get("gym", dataset="basic_arithmetic", template="compact", test_size=20,
                        test_files=write_verl(test, str(tmp_path / "t.jsonl")))
    loaded = compact.examples("test")
    assert compact.score(loaded[3], f" {loaded[3].ground_truth}\n") == 1.0


def test_gym_prompts_and_answer_options():
    plain = tasks.get("gym", dataset="basic_arithmetic", test_size=4, system_prompt="none",
                      instruction="Give only the final number.")
    ex = plain.examples("test", seed=0)[0]
    (user,) = plain.render(ex)
    assert user["role"] == "user" and user["content"].endswith("\nGive only the final number.")
    custom = tasks.get("gym", dataset="basic_arithmetic", test_size=4, system_prompt="You add numbers.")
    assert custom.render(custom.examples("test", seed=0)[0])[0] == {"role": "system", "content": "You add numbers."}
    words = tasks.get("gym", dataset="word_sorting", test_size=4)  # non-numeric answers: the tags only
    w = words.examples("test", seed=0)[0]
    assert words.methods(w) == ("tag",) and words.extract_answer(w, "sorted: a, b") is None
    for bad, match in [(dict(system_prompt="defualt"), "neither a reasoning-gym prompt name"),
                       (dict(answer="tags"), "unknown: tags")]:
        with pytest.raises(ValueError, match=match):
            tasks.get("gym", dataset="basic_arithmetic", **bad)
