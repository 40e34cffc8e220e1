"""The sampler's decode layout: no weight is gathered inside the compiled decode loop (read from the HLO on
8 virtual devices), the same samples as one device, the "auto" rule and its errors."""
import jax
import numpy as np
import pytest

from passk_jax import hlo, parallel
from passk_jax.models.transformer import ModelConfig, init
from passk_jax.sampling import DecodeWeights, Sampler, choose_decode_layout

PROMPTS = [[1, 2, 3], [4, 5, 6, 7], [8, 9], [10, 11, 12, 13, 14]] * 2
KW = dict(num_samples=2, max_new_tokens=12)


def _cfg(**kw):
    return ModelConfig.tiny(vocab_size=64, max_position_embeddings=64, scan_layers=True, **kw)


def _param_shapes(params, mesh):
    """Every parameter's shape, whole, per layer and per device under the training and decode layouts."""
    shapes = set()
    for x in jax.tree.leaves(params):
        for full in (x.shape, x.shape[1:]):
            shapes.add(tuple(full))
    for rules in (None, parallel.DECODE_RULES):
        for x, sh in zip(jax.tree.leaves(params), jax.tree.leaves(parallel.param_shardings(params, mesh, rules))):
            shapes.add(tuple(sh.shard_shape(x.shape)))
            shapes.add(tuple(sh.shard_shape(x.shape))[1:])
    return shapes


def _decode_loop(sampler, params):
    text = sampler.lower(params, num_prompts=len(PROMPTS), bucket=8, **KW)["decode"].compile().as_text()
    loops = hlo.loop_collectives(text)
    return max(loops, key=lambda lp: lp.bytes_per_iteration)


@pytest.mark.parametrize("mesh_shape", [(2, 4, 1), (2, 2, 2)])
def test_replicated_decode_loop_gathers_no_weight(mesh_shape):
    mesh = parallel.make_mesh(*mesh_shape)
    cfg = _cfg()
    graphdef, params = init(cfg, seed=0, mesh=mesh)
    layer_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params["layers"]))
    trained = _decode_loop(Sampler(graphdef, cfg, mesh=mesh, decode_layout="training", layers="model"), params)
    # the check sees what it must: the FSDP layout gathers every layer's weights on every step
    assert trained.by_kind.get("all-gather", 0) >= 0.99 * layer_bytes / mesh_shape[2]
    step = _decode_loop(Sampler(graphdef, cfg, mesh=mesh, decode_layout="replicated", layers="model"), params)
    weight_shapes = _param_shapes(params, mesh)
    gathered = [shape for kind, shape, _ in step.ops if kind == "all-gather"]
    assert not [s for s in gathered if any(tuple(map(int, d.split(","))) in weight_shapes
                                           for _, d in hlo._ARRAY.findall(s) if d)], gathered
    if mesh_shape[2] == 1:  # rows over data x fsdp only: nothing but the loop's "all rows done" flag
        assert step.bytes_per_iteration <= 16, step.ops
    else:  # tensor-parallel blocks: activation all-reduces, a small share of the weights
        assert step.bytes_per_iteration <= 0.05 * layer_bytes, step.ops


@pytest.mark.parametrize("dtype,atol", [("float32", 1e-5), ("bfloat16", 2e-2)])
def test_replicated_layout_samples_like_one_device(dtype, atol):
    """Same key, greedy: the 8-device replicated decode picks the single-device tokens; the logits (of the
    prefill, through the same decode weights) agree to float32 rounding, or for bf16 to its unit roundoff
    2^-8 on O(1) logits (different reduction order across devices), and on one device the bf16 decode copy
    is bitwise the cast-at-use computation."""
    cfg = _cfg(dtype=dtype)
    graphdef, params = init(cfg, seed=0)
    kw = dict(KW, key=jax.random.PRNGKey(3), temperature=0.0)
    ref = Sampler(graphdef, cfg, decode_layout="training").sample(params, PROMPTS, **kw)
    one = Sampler(graphdef, cfg, decode_layout="replicated")
    weights = one.prepare(params)
    assert isinstance(weights, DecodeWeights) and one.prepare(weights) is weights
    assert {x.dtype for x in jax.tree.leaves(weights.params)} == {np.dtype(dtype)}
    same = one.sample(weights, PROMPTS, **kw)
    for name in ("tokens", "logprobs", "lengths"):
        np.testing.assert_array_equal(getattr(same, name), getattr(ref, name), err_msg=name)
    ref_logits = Sampler(graphdef, cfg, decode_layout="training").prefill(params, PROMPTS)[1]
    np.testing.assert_array_equal(one.prefill(weights, PROMPTS)[1], ref_logits)
    mesh = parallel.make_mesh(2, 4, 1)
    graphdef8, params8 = init(cfg, seed=0, mesh=mesh)
    eight = Sampler(graphdef8, cfg, mesh=mesh, decode_layout="replicated")
    out = eight.sample(params8, PROMPTS, **kw)
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    np.testing.assert_allclose(eight.prefill(params8, PROMPTS)[1], ref_logits, atol=atol)


def test_auto_rule_and_errors():
    assert choose_decode_layout("auto", 10e9, 80e9) == "replicated"
    assert choose_decode_layout("auto", 30e9, 80e9) == "training"  # more than a quarter of the device
    assert choose_decode_layout("auto", 30e9, None) == "replicated"  # CPU: memory unknown
    assert choose_decode_layout("training", 1, 80e9) == "training"
    with pytest.raises(ValueError, match="rollout.decode_layout must be one of"):
        choose_decode_layout("gathered", 1, None)
    cfg = _cfg()
    graphdef, params = init(cfg, seed=0)
    small = Sampler(graphdef, cfg, decode_layout="auto", device_memory=1e5)
    assert small.layout_for(params) == "training" and small.prepare(params).params is params
    with pytest.raises(ValueError, match=r"rollout.decode_layout='replicated' needs .* GiB of weights per device"):
        Sampler(graphdef, cfg, decode_layout="replicated", device_memory=1e5).prepare(params)
