"""The README's "Driving a custom loop from Python": the same public calls on a tiny config, stopping early
by a rule of the script's own, then resuming with ``trainer.train`` to the end."""
import os

import chex
import jax
import numpy as np

from passk_jax.rl import rollout
from passk_jax.run import state as run_state, trainer
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
    with trainer.setup(spec, workdir) as run:  # the lock was released; resumes at step 2
        # restored into the abstract target: no train state (nor its program) built only to be overwritten
        assert run.programs.compiled == () and run.step == 2
        target = run.res.restore_target()
        assert all(isinstance(x, jax.ShapeDtypeStruct) and x.sharding is not None for x in jax.tree.leaves(target))
        chex.assert_trees_all_equal_shapes_and_dtypes(target, run_state.checkpoint_tree(run.state))
        before = run.loop
        loop, metrics = trainer.rl_step(run.res, run.programs, before)  # the loop state is threaded through
        assert (before.step, loop.step, loop.position - before.position) == (2, 3, spec.rollout.prompts_per_step)
        assert loop.saved == 3 and run.loop is before and np.isfinite(metrics["step/loss"])
        chex.assert_trees_all_equal_structs(loop.state, before.state)
        run.loop = loop
        assert trainer.finish(run)["status"] == "done"
    assert os.path.exists(os.path.join(workdir, "report.md"))


def test_run_keys_are_named_derivations_of_the_seed():
    """The trainer's random streams: fixed derivations of the seed (a resumed run draws the same keys), each
    distinct from the others and from every other step's rollout key."""
    keys = run_state.RunKeys(7)
    root = jax.random.PRNGKey(7)
    chex.assert_trees_all_equal(keys.root, root)
    chex.assert_trees_all_equal(keys.train_state, jax.random.fold_in(root, 1))
    chex.assert_trees_all_equal(keys.eval, jax.random.fold_in(root, 2))
    chex.assert_trees_all_equal(keys.rollout(5), jax.random.fold_in(jax.random.fold_in(root, 3), 5))
    drawn = [keys.root, keys.train_state, keys.eval] + [keys.rollout(t) for t in range(4)]
    assert len({tuple(np.asarray(k).tolist()) for k in drawn}) == len(drawn)
