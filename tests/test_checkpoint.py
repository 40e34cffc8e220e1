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


def test_replicated_and_sharded_arrays_on_8_cpu_devices_round_trip(tmp_path):
    """On CPU devices each array is written from one replica (no per-replica slicing; see
    ``checkpoint._single_writer_arrays``); arrays replicated over 8 devices and sharded over them come back
    bit-identical onto their shardings."""
    import orbax.checkpoint as ocp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    rep, rows = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    state = {"rep": jax.device_put(np.arange(24.0).reshape(8, 3), rep),
             "rows": jax.device_put(np.arange(16, dtype=np.int32).reshape(8, 2), rows),
             "typed_key": jax.random.key(3)}  # needs Orbax's array-metadata store, kept by the override
    ckpt = Checkpointer(str(tmp_path / "c"), keep=1)
    assert ocp.type_handlers.get_type_handler(jax.Array)._use_replica_parallel is False
    ckpt.save(1, state, {})
    ckpt.wait()
    _, out, _ = ckpt.restore_latest(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                                 state))
    for name in ("rep", "rows"):
        assert out[name].sharding == state[name].sharding
        np.testing.assert_array_equal(np.asarray(out[name]), np.asarray(state[name]))
    assert out["typed_key"].dtype == state["typed_key"].dtype  # a typed key, not its uint32 data
    np.testing.assert_array_equal(jax.random.key_data(out["typed_key"]), jax.random.key_data(state["typed_key"]))
    assert os.path.isdir(os.path.join(str(tmp_path / "c"), "1", "state", "array_metadatas"))
    ckpt.close()
