"""experiments.pilot: the initial policy's held-out row for a config, without a workdir (tiny maze model)."""
import pytest

from experiments import configs, pilot
from passk_jax.run.spec import RunSpec


def test_pilot_row_of_a_fresh_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written: no workdir, no tokenizer copy
    c = configs.get("passk_k4")
    c.task.options.train_sizes = (5,)
    c.task.options.test_sizes = (5,)
    c.task.num_train = 8
    c.eval.num_prompts, c.eval.num_samples, c.eval.sample_prompts = 4, 4, 4
    c.rollout.max_new_tokens = 8
    row, recs = pilot.pilot(RunSpec.from_config(c), show=2)
    assert set(row) == {"prompts", "n", "pass@1", "pass@1_se", "pass@4", "pass@4_se", "solved_any", "solved_some",
                        "no_answer",
                        "length_mean", "truncated", "load_s", "eval_s"}
    assert (row["prompts"], row["n"]) == (4, 4) and 0 <= row["pass@1"] <= row["pass@4"] == row["solved_any"] <= 1
    assert 0 <= row["solved_some"] <= row["solved_any"]
    assert 1 <= row["length_mean"] <= 8 and 0 <= row["no_answer"] <= 1
    assert len(recs) == 2 and all(len(r["responses"]) == 1 for r in recs)
    assert list(tmp_path.iterdir()) == []
