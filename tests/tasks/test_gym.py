"""reasoning-gym adapter end to end: generate, render, score (inline and in the verifier pool), files."""
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
    responses += ["<answer>not a number</answer>", "no tags at all " + test[6].ground_truth]
    examples = test[:7]
    inline = [task.score(e, r) for e, r in zip(examples, responses)]
    assert inline == [1.0] * 5 + [0.0, 0.0]
    with VerifierPool(num_workers=1, timeout_s=30) as pool:
        assert pool.score(task.score, examples, responses).tolist() == inline
    # compact template takes an untagged response whole; examples survive a verl file round trip
    compact = tasks.get("gym", dataset="basic_arithmetic", template="compact", test_size=20,
                        test_files=write_verl(test, str(tmp_path / "t.jsonl")))
    loaded = compact.examples("test")
    assert compact.score(loaded[3], f" {loaded[3].ground_truth}\n") == 1.0
