"""Continuous batching (``decode_slots``): the same tokens and log-probs as lockstep decoding for any number of
slots, sharded as on one device, KV memory of the slots only, and its bad inputs."""
import jax
import numpy as np
import pytest

from passk_jax import parallel
from passk_jax.models.transformer import ModelConfig, init
from passk_jax.sampling import Sampler

PROMPTS = [[1, 2, 3], [4, 5, 6, 7], [8, 9], [10, 11, 12, 13, 14]]
# three EOS ids of a random 64-token model: rows end after 1 token, after ~10, or run to the cap
KW = dict(num_samples=4, max_new_tokens=20, key=jax.random.PRNGKey(1), temperature=1.0, eos_ids=[5, 7, 9])


@pytest.fixture(scope="module", params=[True, False], ids=["scan", "unrolled"])
def model(request):
    cfg = ModelConfig.tiny(vocab_size=64, max_position_embeddings=128, scan_layers=request.param)
    graphdef, params = init(cfg, seed=0)
    return cfg, graphdef, params


def _same(out, ref):
    for name in ("tokens", "mask", "lengths", "truncated", "prompt_index"):
        np.testing.assert_array_equal(getattr(out, name), getattr(ref, name), err_msg=name)
    # the ring cache sums a row's attention in another order: float32 rounding only
    np.testing.assert_allclose(out.logprobs, ref.logprobs, atol=2e-6)


def test_any_number_of_slots_samples_like_lockstep(model):
    cfg, graphdef, params = model
    sampler = Sampler(graphdef, cfg, phase_start=4, layers="model")
    ref = sampler.sample(params, PROMPTS, **KW)
    lengths = np.asarray(ref.lengths)
    assert lengths.min() <= 2 and lengths.max() == 20 and len(set(lengths.tolist())) >= 5  # long-tailed
    for slots in (16, 7, 3, 1):
        _same(sampler.sample(params, PROMPTS, decode_slots=slots, **KW), ref)
    greedy = dict(KW, temperature=0.0)
    _same(sampler.sample(params, PROMPTS, decode_slots=5, **greedy), sampler.sample(params, PROMPTS, **greedy))


def test_sharded_slots_equal_one_device(model):
    cfg, graphdef, params = model
    ref = Sampler(graphdef, cfg, layers="model").sample(params, PROMPTS, **KW)
    mesh = parallel.make_mesh(2, 2, 2)
    sharded = Sampler(graphdef, cfg, mesh=mesh, layers="model")
    out = sharded.sample(parallel.shard_params(params, mesh), PROMPTS, decode_slots=8, **KW)
    assert out.tokens.sharding.spec[0] is not None  # rows come back split over the batch axes
    _same(out, ref)


def test_kv_memory_is_the_slots_only(model):
    """The decode program's completion cache has a row per slot (8), not per sampled row (4 x 16 = 64)."""
    cfg, graphdef, params = model
    sampler = Sampler(graphdef, cfg, layers="model")
    text = sampler.lower(params, num_prompts=4, bucket=16, num_samples=16, max_new_tokens=64,
                         decode_slots=8)["decode"].as_text()
    lead = f"{cfg.num_layers}x" if cfg.scan_layers else ""
    keys = lambda rows: f"tensor<{lead}{rows}x{cfg.num_kv_heads}x{cfg.head_dim}x63xf32>"  # noqa: E731 - [.., hd, slots]
    assert keys(8) in text and keys(64) not in text


@pytest.mark.parametrize("slots,match", [(-1, r"rollout.decode_slots must be in \[0, 16\]"),
                                         (17, r"rollout.decode_slots must be in \[0, 16\]")])
def test_bad_slots(model, slots, match):
    cfg, graphdef, params = model
    with pytest.raises(ValueError, match=match):
        Sampler(graphdef, cfg).sample(params, PROMPTS, decode_slots=slots, **KW)


def test_slots_must_split_over_the_data_axes(model):
    cfg, graphdef, params = model
    mesh = parallel.make_mesh(2, 2, 2)
    with pytest.raises(ValueError, match=r"rollout.decode_slots=6 is not divisible by the data-parallel size "
                                         r"data\*fsdp=4"):
        Sampler(graphdef, cfg, mesh=mesh).sample(parallel.shard_params(params, mesh), PROMPTS, decode_slots=6, **KW)
