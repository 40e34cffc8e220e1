"""A decode mesh of its own: the sampler factors the training mesh's devices its own way (e.g. tensor-parallel
where training is FSDP), chosen by "auto" from memory; same samples as one device, no weight gathered in the
decode loop, and one sentence for a mesh that does not split the heads or the slots."""
import jax
import numpy as np
import pytest

from passk_jax import hlo, parallel
from passk_jax.models.transformer import ModelConfig, init
from passk_jax.sampling import Sampler, choose_decode_mesh

PROMPTS = [[1, 2, 3], [4, 5, 6, 7], [8, 9], [10, 11, 12, 13, 14]] * 2
CFG = ModelConfig.tiny(vocab_size=64, max_position_embeddings=64, scan_layers=True)  # 4 heads, 2 kv heads
GiB = 2 ** 30


def test_auto_keeps_the_training_mesh_while_the_copy_fits_and_splits_when_not():
    train = parallel.make_mesh(1, 8, 1)
    pick = lambda w, mem, **kw: choose_decode_mesh("auto", train, CFG, w, mem, kw.pop("max_tensor", 8), **kw)  # noqa: E731
    assert pick(1 * GiB, 80 * GiB, slots=64) is train          # fits whole on every device
    assert pick(1 * GiB, None, slots=64) is train               # memory unknown (CPU)
    m = pick(30 * GiB, 80 * GiB, slots=64)                      # 30 GiB > 25% of 80: tensor 2 (15 GiB) fits
    assert dict(m.shape) == {"data": 4, "fsdp": 1, "tensor": 2}
    assert m.devices.ravel().tolist() == train.devices.ravel().tolist()  # same devices, same order
    assert pick(50 * GiB, 80 * GiB, slots=64) is train          # needs tensor 4 > the 2 kv heads: fall back
    assert pick(30 * GiB, 80 * GiB, slots=64, max_tensor=1) is train  # no wider split inside one node
    assert pick(30 * GiB, 80 * GiB, slots=6) is train           # 6 slots do not split over data=4
    assert pick(30 * GiB, 80 * GiB, slots=64, decode_layout="training") is train  # decode from the parameters


@pytest.mark.parametrize("spec,match", [("1,1,8", "tensor=8 does not divide the model's num_kv_heads=2"),
                                        ("8,1,1", None), ("2,2,2", None),
                                        ("1,2,4", "tensor=4 does not divide the model's num_kv_heads=2"),
                                        ("3,1,2", "needs 6 devices but 8 are given"),
                                        ("a,b", "must be 'auto', 'training' or 'DATA,FSDP,TENSOR'")])
def test_explicit_decode_mesh_is_checked(spec, match):
    train = parallel.make_mesh(1, 8, 1)
    if match is None:
        m = choose_decode_mesh(spec, train, CFG, 0.0, None, 8, slots=8)
        assert [m.shape[a] for a in ("data", "fsdp", "tensor")] == [int(s) for s in spec.split(",")]
    else:
        with pytest.raises(ValueError, match=match):
            choose_decode_mesh(spec, train, CFG, 0.0, None, 8, slots=8)
    with pytest.raises(ValueError, match=r"rollout.decode_slots=6 is not divisible by its data x fsdp = 4"):
        choose_decode_mesh("4,1,2", train, CFG, 0.0, None, 8, slots=6)


def test_sampling_on_a_decode_mesh_of_its_own_equals_one_device():
    """Training layout FSDP over 8 devices, decode mesh data 4 x tensor 2 over the same devices: the weights
    move once (prepare), the decode loop gathers no weight, and the samples are the single-device ones."""
    kw = dict(num_samples=2, max_new_tokens=10, key=jax.random.PRNGKey(3), temperature=0.0)
    graphdef, params = init(CFG, seed=0)
    ref = Sampler(graphdef, CFG, decode_layout="training").sample(params, PROMPTS, **kw)
    train = parallel.make_mesh(1, 8, 1)
    graphdef8, params8 = init(CFG, seed=0, mesh=train)
    dec = choose_decode_mesh("4,1,2", train, CFG, 0.0, None, 8, slots=8)
    sampler = Sampler(graphdef8, CFG, mesh=dec, decode_layout="replicated")
    weights = sampler.prepare(params8)
    assert all(x.sharding.mesh is dec for x in jax.tree.leaves(weights.params))
    out = sampler.sample(weights, PROMPTS, **kw)
    for name in ("tokens", "lengths"):
        np.testing.assert_array_equal(getattr(out, name), getattr(ref, name), err_msg=name)
    np.testing.assert_allclose(out.logprobs, ref.logprobs, atol=1e-5)
    text = sampler.lower(weights, num_prompts=len(PROMPTS), bucket=8, num_samples=2,
                         max_new_tokens=10)["decode"].compile().as_text()
    loop = max(hlo.loop_collectives(text), key=lambda lp: lp.bytes_per_iteration)
    layer_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params8["layers"]))
    assert loop.by_kind.get("all-gather", 0) < 0.05 * layer_bytes, loop.ops  # activations only
    assert loop.bytes_per_iteration <= 0.05 * layer_bytes, loop.ops
    # the training layout on a mesh of its own: the parameters are moved to it, not read across meshes
    same = Sampler(graphdef8, CFG, mesh=dec, decode_layout="training").sample(params8, PROMPTS, **kw)
    np.testing.assert_array_equal(same.tokens, ref.tokens)


@pytest.mark.parametrize("overrides,match", [
    ({"rollout.decode_mesh": "tensor"}, "rollout.decode_mesh must be 'auto', 'training' or 'DATA,FSDP,TENSOR'"),
    ({"rollout.decode_mesh": "1,1,3"}, r"rollout.decode_mesh='1,1,3': mesh data=1 x fsdp=1 x tensor=3 needs 3 devices"),
    ({"rollout.decode_mesh": "4,1,2", "rollout.decode_slots": 6},
     r"rollout.decode_mesh='4,1,2': rollout.decode_slots=6 is not divisible by its data x fsdp = 4"),
])
def test_bad_decode_mesh_in_a_config_is_one_sentence(overrides, match):
    from experiments import configs
    from passk_jax.run.spec import RunSpec

    c = configs.get("passk_k4")
    for key, value in overrides.items():
        section, field = key.split(".")
        c[section][field] = value
    with pytest.raises(ValueError, match=match):
        RunSpec.from_config(c)
