"""Checkpointer: keep-N, JSON meta, and falling back past an unreadable newest step."""
import os

import jax
import jax.numpy as jnp
import numpy as np

from passk_jax.run.checkpoint import Checkpointer


def _state(shift):
    return {"params": {"w": jnp.arange(6.0).reshape(2, 3) + shift}, "step": jnp.int32(shift),
            "key": jax.random.key_data(jax.random.PRNGKey(shift))}


def test_keep_n_and_restore(tmp_path):
    ckpt = Checkpointer(str(tmp_path / "c"), keep=2)
    for step in (1, 2, 3):
        ckpt.save(step, _state(step), {"data_position": 10 * step})
    ckpt.wait()
    assert ckpt.steps() == [2, 3]
    step, state, meta = ckpt.restore_latest(_state(0))
    assert step == 3 and meta == {"data_position": 30}
    np.testing.assert_array_equal(state["params"]["w"], np.arange(6.0).reshape(2, 3) + 3)
    np.testing.assert_array_equal(state["key"], jax.random.key_data(jax.random.PRNGKey(3)))
    ckpt.close()


def test_corrupt_newest_step_falls_back(tmp_path, caplog):
    ckpt = Checkpointer(str(tmp_path / "c"), keep=3)
    for step in (1, 2):
        ckpt.save(step, _state(step), {"data_position": step})
    ckpt.close()
    for root, _, files in os.walk(tmp_path / "c" / "2"):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"garbage")
    again = Checkpointer(str(tmp_path / "c"), keep=3)
    step, state, meta = again.restore_latest(_state(0))
    assert step == 1 and meta == {"data_position": 1}
    assert "unreadable" in caplog.text
    again.close()


def test_empty_directory_has_nothing(tmp_path):
    ckpt = Checkpointer(str(tmp_path / "empty"))
    assert ckpt.restore_latest(_state(0)) is None
    ckpt.close()
