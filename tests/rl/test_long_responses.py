"""A trainer run with 512-token responses (its own file: the slowest test that needs no shared fixture, so
pytest-xdist's per-file scheduling can put it beside tests/rl/test_trainer.py)."""
import numpy as np

from passk_jax.run import trainer
from passk_jax.run.metric_log import read_jsonl
from passk_jax.run.spec import RunSpec
from tests.rl.test_trainer import tiny_config


def test_long_responses_train_and_evaluate(tmp_path):
    """512-token responses (rollout.ignore_eos) go through rollout (continuous batching over 8 slots), the
    update, with the O(S)-memory blocked attention kernel that "auto" picks here, and evaluation."""
    from passk_jax.models.transformer import no_cache_kernel

    c = tiny_config(tmp_path / "cache", **{"rollout.max_new_tokens": 512, "model.max_len": 560, "sft.steps": 0,
                                           "rollout.ignore_eos": True, "rollout.decode_slots": 8,
                                           "rollout.prompts_per_step": 2, "rollout.num_samples": 4, "train.steps": 1,
                                           "train.eval_every": 0, "eval.num_prompts": 2, "eval.num_samples": 4,
                                           "eval.greedy": False, "train.export_hf": False,
                                           # an entropy term: no row is skipped even when every reward is 0, so
                                           # the packed update runs on the full 512-token rows
                                           "step.entropy_coef": 1e-4})
    out = trainer.train(RunSpec.from_config(c), str(tmp_path / "run"))
    assert out["status"] == "done"
    step = next(r for r in read_jsonl(str(tmp_path / "run" / "metrics.jsonl")) if "rollout/length_max" in r)
    assert step["step/rows_computed_frac"] == 1.0
    assert step["rollout/length_mean"] == 512 and step["rollout/truncated_frac"] == 1.0
    assert np.isfinite(step["step/loss"]) and step["step/entropy"] > 0
    assert "eval/pass@4" in out["final"]
    assert no_cache_kernel(trainer.build_model(RunSpec.from_config(c), None, str(tmp_path / "run"))[2]) == "blocked"
