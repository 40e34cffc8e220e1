"""One definition of a pass (``metrics.is_pass``: reward >= ``metrics.PASS_THRESHOLD``) everywhere it is used:
the advantage estimators' N_pos, the step's ``rollout_pass@k`` and held-out evaluation. A reward exactly at
the threshold passes in each of them; one just below fails in each of them."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from passk_jax import advantages, metrics
from passk_jax.rl import rollout, step as rl_step
from passk_jax.run import evaluation
from passk_jax.sampling import PaddedPrompts

AT = metrics.PASS_THRESHOLD
BELOW = float(np.nextafter(np.float32(AT), np.float32(0)))
# prompt 0: one reward at the threshold (passes), prompt 1: one just below it (fails); the rest are 0 / 1.
REWARDS = np.array([[AT, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0],
                    [BELOW, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0]], np.float32)
PASSES = np.array([2, 1])  # passing responses per prompt
K = 2


def test_is_pass_at_the_threshold():
    assert metrics.is_pass(AT) and not metrics.is_pass(BELOW)
    np.testing.assert_array_equal(metrics.is_pass(REWARDS).sum(1), PASSES)
    np.testing.assert_array_equal(jax.jit(metrics.is_pass)(jnp.asarray(REWARDS)).sum(1), PASSES)
    assert rl_step.StepConfig().success_threshold == AT


def test_advantage_estimators_count_the_edge_as_a_pass():
    r = jnp.asarray(REWARDS)
    acc = (PASSES / REWARDS.shape[1])[:, None]
    expect = acc * advantages.passk_analytic(r, K) + (1 - acc) * advantages.grpo(r)
    np.testing.assert_allclose(advantages.combination(r, K), expect, rtol=1e-6, atol=1e-7)
    factor = (4.0 / (10.0 * np.log(PASSES + 0.5)))[:, None]
    np.testing.assert_allclose(advantages.exceed(r, K), factor * advantages.passk_analytic(r, K),
                               rtol=1e-6, atol=1e-7)


def test_step_rollout_pass_at_k_counts_the_edge_as_a_pass():
    r = jnp.asarray(REWARDS)
    valid = jnp.ones(r.shape, bool)
    out = rl_step.group_metrics(jnp.zeros_like(r), r, valid, jnp.ones(r.shape), K, AT)
    n = REWARDS.shape[1]
    expect = np.mean(np.asarray(metrics.pass_at_k(np.full(2, n), PASSES, K)))
    np.testing.assert_allclose(out["rollout_pass@k"], expect, rtol=1e-6)


def test_evaluation_counts_the_edge_as_a_pass(monkeypatch):
    p, n = REWARDS.shape

    def fake_generate(env, params, examples, *, num_samples, **kw):
        rewards = REWARDS if num_samples == n else REWARDS[:, :1]
        rows = rewards.size
        prompts = PaddedPrompts.pad([[1]] * len(examples), (1,), pad_id=0)
        return rollout.Rollouts(list(examples), prompts, np.zeros((rows, 1), np.int32),
                                np.zeros((rows, 1), np.float32), np.ones((rows, 1), bool), np.ones(rows, np.int32),
                                np.zeros(rows, bool), [f"t{i}" for i in range(rows)], rewards, {})

    class FakeSampler:
        def prepare(self, params):
            return params

    monkeypatch.setattr(rollout, "generate", fake_generate)
    examples = [type("Ex", (), {"data_source": "edge"})() for _ in range(p)]
    env = rollout.Env(FakeSampler(), None, None, None)
    out, per_prompt = evaluation.evaluate(env, None, examples, num_samples=n, max_new_tokens=1,
                                          key=jax.random.PRNGKey(0))
    np.testing.assert_array_equal(per_prompt["correct"], PASSES)
    assert out["eval/greedy_accuracy"] == pytest.approx(0.5)  # the edge reward passes, the one below fails
    assert out["eval/pass@1"] == pytest.approx(np.mean(PASSES / n))
