"""The README's "Driving a custom loop from Python": the same public calls on a tiny config, stopping early
by a rule of the script's own, then resuming with ``trainer.train`` to the end."""
import os

import numpy as np

from passk_jax.rl import rollout
from passk_jax.run import trainer
from passk_jax.run.spec import RunSpec
from tests.rl.test_trainer import tiny_config


def test_custom_loop_with_the_public_parts(tmp_path):
    config = tiny_config(tmp_path / "cache", **{"sft.steps": 0, "train.steps": 3, "train.eval_every": 0,
                                                "eval.greedy": False, "train.export_hf": False})
    spec = RunSpec.from_config(config)
    workdir = str(tmp_path / "run")
    seen = []
    with trainer.setup(spec, workdir) as run:
        while run.running:
            metrics = run.rl_step()
            seen.append(metrics["step/loss"])
            if run.step == 2:  # the script's own stopping rule
                break
        assert "eval/pass@4" in run.evaluate()
        r = rollout.generate(run.env, run.state.params, run.test_examples[:2], num_samples=4,
                             max_new_tokens=spec.rollout.max_new_tokens, key=run.root)
        assert r.rewards.shape == (2, 4)
        summary = trainer.finish(run)
    assert summary["status"] == "stopped" and summary["step"] == 2 and len(seen) == 2
    assert np.all(np.isfinite(seen))
    assert trainer.train(spec, workdir)["status"] == "done"  # the lock was released; resumes at step 2
    assert os.path.exists(os.path.join(workdir, "report.md"))
