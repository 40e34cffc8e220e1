"""Mesh construction and the logical-axis rules (8 virtual CPU devices)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from passk_jax import parallel
from passk_jax.models import transformer as T


def test_make_mesh_sizes_and_errors():
    assert dict(parallel.make_mesh().shape) == {"data": 8, "fsdp": 1, "tensor": 1}
    assert dict(parallel.make_mesh(data=2, fsdp=-1, tensor=2).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert parallel.make_mesh(data=1, devices=jax.devices()[:1]).devices.size == 1
    assert parallel.make_mesh().axis_names == parallel.MESH_AXES
    with pytest.raises(ValueError, match="needs 3 devices but 8"):
        parallel.make_mesh(data=3)
    with pytest.raises(ValueError, match="at most one -1"):
        parallel.make_mesh(data=-1, fsdp=-1)
    with pytest.raises(ValueError, match="cannot be split"):
        parallel.make_mesh(data=-1, tensor=3)


def test_logical_spec_rules_dedup_and_divisibility():
    mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
    # batch takes data+fsdp, so an activation's embed stays replicated; weights shard embed over fsdp
    assert parallel.logical_spec(("batch", "length", "embed"), mesh) == P(("data", "fsdp"))
    assert parallel.logical_spec(("embed", "mlp"), mesh) == P("fsdp", "tensor")
    assert parallel.logical_spec(("layers", "heads", "head_dim", "embed"), mesh) == P(None, "tensor", None, "fsdp")
    assert parallel.logical_spec(("batch", "length", "vocab"), mesh, (8, 5, 7)) == P(("data", "fsdp"))
    assert parallel.logical_spec(("batch", "embed"), mesh, (2, 64)) == P("data", "fsdp")
    assert parallel.logical_spec((None, "norm"), mesh) == P()
    single = parallel.make_mesh(data=1, devices=jax.devices()[:1])
    assert parallel.logical_spec(("batch", "embed"), single) == P()
    with pytest.raises(ValueError, match="unknown logical axis 'hidden'"):
        parallel.logical_spec(("hidden",), mesh)
    names = {name for name, _ in parallel.LOGICAL_RULES}
    assert {"batch", "vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "layers", "length"} <= names


def test_param_shardings_and_shard_params_follow_metadata():
    cfg = T.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                        num_kv_heads=2, attention_bias=True)
    mesh = parallel.make_mesh(data=1, fsdp=4, tensor=2)
    graphdef, abstract = T.split(nnx.eval_shape(lambda: T.Transformer(cfg)))
    shardings = parallel.param_shardings(abstract, mesh)
    flat = {".".join(map(str, path)): v.get_value() for path, v in nnx.to_flat_state(shardings)}
    spec = lambda *path: flat[".".join(path)].spec  # noqa: E731
    assert spec("embed_tokens") == P("tensor", "fsdp")
    assert spec("layers", "q_proj") == P(None, "fsdp", "tensor")
    assert spec("layers", "k_bias") == P(None, "tensor")
    assert spec("layers", "down_proj") == P(None, "tensor", "fsdp")
    assert spec("layers", "input_norm") == P()

    graphdef, params = T.init(cfg, seed=0)
    placed = parallel.shard_params(params, mesh)
    for (path, want), (_, got) in zip(nnx.to_flat_state(shardings), nnx.to_flat_state(placed)):
        assert got.get_value().sharding == want.get_value(), path
    # the shardings pytree drives jit directly, and a model created sharded matches
    same = jax.jit(lambda p: p, out_shardings=shardings)(params)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), same, params))
    _, direct = T.init(cfg, seed=0, mesh=mesh)
    assert direct["layers"]["gate_proj"].get_value().sharding.spec == P(None, "fsdp", "tensor")
    np.testing.assert_array_equal(np.asarray(direct["layers"]["gate_proj"].get_value()),
                                  np.asarray(params["layers"]["gate_proj"].get_value()))


def test_constrain_is_a_no_op_without_a_mesh_and_shards_with_one():
    x = jnp.ones((8, 4, 16))
    assert parallel.constrain(x, ("batch", "length", "embed")) is x
    mesh = parallel.make_mesh(data=2, fsdp=4)
    with jax.set_mesh(mesh):
        y = jax.jit(lambda a: parallel.constrain(a * 2, ("batch", "length", "embed")))(x)
    assert y.sharding.spec == P(("data", "fsdp"))


def test_host_global_round_trip():
    mesh = parallel.make_mesh()
    local = np.arange(16 * 3, dtype=np.int32).reshape(16, 3)
    arr = parallel.to_global(local, mesh, ("batch", "length"))
    assert arr.shape == (16, 3) and arr.sharding.spec == P("data")
    np.testing.assert_array_equal(parallel.to_host(arr), local)
