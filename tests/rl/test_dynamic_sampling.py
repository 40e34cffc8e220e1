"""Dynamic sampling in the trainer's collect(): constant-reward prompts are dropped and refilled, the data
position advances by every prompt drawn, and hitting the refill cap is one clear error."""
import jax
import numpy as np
import pytest

from passk_jax.rl import rollout
from passk_jax.run import trainer
from passk_jax.run.data import DataStream
from passk_jax.run.spec import RolloutSpec
from passk_jax.sampling import PaddedPrompts


def fake_rollouts(examples, n):
    """Rewards: example e (an int) is solved by rollouts j < e % (n + 1), so e % (n + 1) in {0, n} is constant."""
    rewards = np.array([[float(j < e % (n + 1)) for j in range(n)] for e in examples], np.float32)
    rows = len(examples) * n
    prompts = PaddedPrompts.pad([[1, 2]] * len(examples), (2,), pad_id=0)
    return rollout.Rollouts(list(examples), prompts, np.zeros((rows, 3), np.int32),
                            np.zeros((rows, 3), np.float32), np.ones((rows, 3), bool), np.full(rows, 3),
                            np.zeros(rows, bool), [str(i) for i in range(rows)], rewards, {"time/sample": 0.1})


@pytest.fixture
def config():
    return RolloutSpec(prompts_per_step=4, num_samples=4, decode_slots=8, dynamic_sampling=True, max_refills=3)


def test_drops_constant_groups_and_refills(monkeypatch, config):
    monkeypatch.setattr(rollout, "generate", lambda *a, **kw: fake_rollouts(a[2], 4))
    stream = DataStream(list(range(20)), seed=0)
    r, position, extra = trainer.collect(config, None, None, stream, 0, key=jax.random.PRNGKey(0))
    assert len(r.examples) == 4 and r.rewards.shape == (4, 4) and r.tokens.shape == (16, 3)
    assert np.all(r.rewards.max(1) > r.rewards.min(1))
    assert position == 4 * (1 + extra["rollout/refills"])


def test_refill_cap_is_a_clear_error(monkeypatch, config):
    monkeypatch.setattr(rollout, "generate", lambda *a, **kw: fake_rollouts(a[2], 4))
    stream = DataStream([0, 5, 10, 20], seed=0)  # every prompt has constant rewards
    with pytest.raises(RuntimeError, match="max_refills=3"):
        trainer.collect(config, None, None, stream, 0, key=jax.random.PRNGKey(0))
