"""Sampler end to end on a random tiny Qwen2: HF greedy parity, logprobs vs teacher forcing, first-token
frequencies, EOS / lengths / truncation, determinism, one compilation, sharded == unsharded, bad input."""

import dataclasses
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from passk_jax import parallel
from passk_jax.models import hf
from passk_jax.models.transformer import Transformer, forward, split
from passk_jax.sampling import PaddedPrompts, Sampler, decode_phases, default_buckets, left_pad
from passk_jax.sampling_ops import modified_logits, token_logprobs

VOCAB = 128
PROMPTS = [[5, 17, 99, 3], list(range(20, 39)), [7], [100, 101, 102, 103, 104, 105, 106, 107, 108]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(HF torch model, graphdef, params, cfg) of one random Qwen2 saved by HF and read by load_pretrained.
    initializer_range 0.1 keeps logits within about +-4, so float32 rounding stays well under 1e-5 in log-probs."""
    torch.manual_seed(0)
    config = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      initializer_range=0.1, tie_word_embeddings=False, rope_theta=1e4)
    model = transformers.Qwen2ForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("qwen2")
    model.save_pretrained(path)
    jmodel, cfg = hf.load_pretrained(path)
    graphdef, params = split(jmodel)
    return model, graphdef, params, cfg


@pytest.fixture(scope="module")
def sampler(tiny):
    _, graphdef, _, cfg = tiny
    return Sampler(graphdef, cfg)


def test_buckets_and_left_pad():
    assert default_buckets(100) == (16, 32, 64, 100)
    assert default_buckets(64) == (16, 32, 64)
    tokens, positions, mask = left_pad([[4, 5, 6], [9]], 5, pad_id=1)
    np.testing.assert_array_equal(tokens, [[1, 1, 4, 5, 6], [1, 1, 1, 1, 9]])
    np.testing.assert_array_equal(positions, [[0, 0, 0, 1, 2], [0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(mask, [[0, 0, 1, 1, 1], [0, 0, 0, 0, 1]])


def test_padded_prompts_select_and_concat_equal_a_fresh_left_pad():
    """The sampler's prompt layout after dynamic sampling's select / concat is exactly left_pad of the kept
    prompts to the smallest bucket that holds them (the train batch's prompt columns)."""
    buckets = (4, 8, 16)
    a = [[3] * 10, [4, 5], [6] * 5]
    b = [[7], [8, 9, 10]]
    pa, pb = PaddedPrompts.pad(a, buckets, pad_id=1), PaddedPrompts.pad(b, buckets, pad_id=1)
    assert (pa.tokens.shape[1], pb.tokens.shape[1]) == (16, 4)
    cases = [(PaddedPrompts.concat([pa, pb]), a + b),
             (PaddedPrompts.concat([pa.select(np.array([False, True, True])), pb]), a[1:] + b),
             (PaddedPrompts.concat([pa.select(np.array([False, True, False])), pb.select(np.array([True, False]))]),
              [a[1], b[0]])]
    for got, prompts in cases:
        width = next(w for w in buckets if w >= max(map(len, prompts)))
        for x, y in zip((got.tokens, got.positions, got.mask), left_pad(prompts, width, pad_id=1)):
            assert x.dtype == y.dtype
            np.testing.assert_array_equal(x, y)


def test_greedy_matches_transformers_generate(tiny, sampler):
    model, _, params, _ = tiny
    new = 12
    out = sampler.sample(params, PROMPTS, num_samples=2, max_new_tokens=new, temperature=0.0,
                         key=jax.random.key(0))
    assert out.tokens.shape == (len(PROMPTS) * 2, new)
    np.testing.assert_array_equal(out.prompt_index, np.repeat(np.arange(len(PROMPTS)), 2))
    for p, prompt in enumerate(PROMPTS):  # one prompt at a time: no HF padding conventions involved
        with torch.no_grad():
            ref = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=new, min_new_tokens=new,
                                 eos_token_id=None, pad_token_id=0)[0, len(prompt):].numpy()
        for j in range(2):
            np.testing.assert_array_equal(np.asarray(out.tokens[2 * p + j]), ref)
    assert np.all(np.asarray(out.logprobs) == 0) and np.all(np.asarray(out.mask))
    _, logits = sampler.prefill(params, PROMPTS)  # the prefill program alone picks the same first tokens
    np.testing.assert_array_equal(np.argmax(np.asarray(logits), -1), np.asarray(out.tokens[::2, 0]))


def teacher_forced(graphdef, params, prompts, out, n, knobs):
    """Recompute the (modified-distribution) logprobs of the sampled tokens with one cache-free forward over
    [prompt | completion] per row (left-padded prompt, completion masked after its length)."""
    tokens = np.asarray(out.tokens)
    rows, new = tokens.shape
    width = max(map(len, prompts))
    seq, pos, msk = left_pad([prompts[r // n] for r in range(rows)], width)
    seq = np.concatenate([seq, tokens], 1)
    msk = np.concatenate([msk, np.asarray(out.mask)], 1)
    pos = np.concatenate([pos, pos[:, -1:] + 1 + np.arange(new)[None]], 1)
    logits, _ = jax.jit(forward, static_argnums=0)(graphdef, params, seq, pos, msk)
    return np.asarray(token_logprobs(logits[:, width - 1:-1], jnp.asarray(tokens), *knobs))


@pytest.mark.parametrize("knobs", [(0.8, 0.9, 20), (1.0, 1.0, 0), (0.5, 1.0, 0), (1.7, 0.5, 0)])
def test_logprobs_match_teacher_forcing(tiny, sampler, knobs):
    _, graphdef, params, _ = tiny
    n = 3
    out = sampler.sample(params, PROMPTS, num_samples=n, max_new_tokens=10, temperature=knobs[0], top_p=knobs[1],
                         top_k=knobs[2], eos_ids=[11, 12, 13], key=jax.random.key(1))
    lp = teacher_forced(graphdef, params, PROMPTS, out, n, knobs)
    mask = np.asarray(out.mask)
    np.testing.assert_allclose(np.asarray(out.logprobs)[mask], lp[mask], atol=1e-5)
    assert np.all(np.asarray(out.logprobs)[~mask] == 0)


def test_first_token_frequencies(tiny, sampler):
    """20k samples of one prompt, one new token, T = 1.5, top_k = 8: the 8 kept tokens (plus ties, none
    here) must follow softmax(z / T) renormalised.  Bretagnolle-Huber-Carol with m = 8 categories:
    P(||p_hat - p||_1 >= lam) <= 2^8 exp(-N lam^2 / 2) = 1e-6 at lam = 0.044, i.e. TV <= 0.022."""
    _, graphdef, params, _ = tiny
    n, t, k = 20_000, 1.5, 8
    out = sampler.sample(params, [PROMPTS[0]], num_samples=n, max_new_tokens=1, temperature=t, top_k=k,
                         key=jax.random.key(2))
    seq = jnp.asarray([PROMPTS[0]])
    logits, _ = forward(graphdef, params, seq, jnp.arange(seq.shape[1])[None], jnp.ones_like(seq, bool))
    want = np.asarray(jax.nn.softmax(modified_logits(logits[:, -1], t, 1.0, k))[0], np.float64)
    assert (want > 0).sum() == k
    counts = np.bincount(np.asarray(out.tokens[:, 0]), minlength=VOCAB)
    assert counts[want == 0].sum() == 0
    lam = math.sqrt(2 * (k * math.log(2) + math.log(1e6)) / n)
    assert 0.5 * np.abs(counts / n - want).sum() <= lam / 2


def test_eos_lengths_and_truncation(tiny, sampler):
    _, _, params, _ = tiny
    new = 10
    base = np.asarray(sampler.sample(params, PROMPTS, num_samples=1, max_new_tokens=new, temperature=0.0,
                                     key=jax.random.key(0)).tokens)
    eos = int(base[0, 3])  # row 0 stops at its first occurrence of this token
    out = sampler.sample(params, PROMPTS, num_samples=1, max_new_tokens=new, temperature=0.0, eos_ids=[eos],
                         key=jax.random.key(0))
    tokens, mask, lengths = map(np.asarray, (out.tokens, out.mask, out.lengths))
    for r in range(len(PROMPTS)):
        hits = np.flatnonzero(base[r] == eos)
        length = hits[0] + 1 if len(hits) else new
        assert lengths[r] == length and bool(out.truncated[r]) == (len(hits) == 0)
        np.testing.assert_array_equal(tokens[r, :length], base[r, :length])  # EOS itself included
        assert np.all(tokens[r, length:] == sampler.pad_id)
        np.testing.assert_array_equal(mask[r], np.arange(new) < length)
    assert lengths[0] <= 4 and not out.truncated[0]
    # Every row stops at once when each first token is an EOS id.
    out = sampler.sample(params, PROMPTS, num_samples=1, max_new_tokens=new, temperature=0.0,
                         eos_ids=sorted(set(base[:, 0].tolist())), key=jax.random.key(0))
    np.testing.assert_array_equal(out.lengths, 1)
    assert not np.any(np.asarray(out.truncated)) and np.all(np.asarray(out.tokens)[:, 1:] == sampler.pad_id)


def test_determinism_and_one_compilation(tiny):
    _, graphdef, params, cfg = tiny
    sampler = Sampler(graphdef, cfg)
    kw = dict(num_samples=2, max_new_tokens=8)
    a = sampler.sample(params, PROMPTS, temperature=1.0, key=jax.random.key(3), **kw)
    b = sampler.sample(params, PROMPTS, temperature=1.0, key=jax.random.key(3), **kw)
    c = sampler.sample(params, PROMPTS, temperature=1.0, key=jax.random.key(4), **kw)
    chex.assert_trees_all_equal(a, b)  # every array, the padded prompts included
    assert not np.array_equal(a.tokens, c.tokens)
    for t, p, k, eos in [(0.0, 1.0, 0, ()), (0.5, 0.9, 0, (3,)), (2.0, 1.0, 5, (1, 2)), (1.0, 0.3, 7, ())]:
        sampler.sample(params, PROMPTS, temperature=t, top_p=p, top_k=k, eos_ids=eos, key=jax.random.key(5), **kw)
    assert sampler.compile_counts() == {"prefill": 1, "decode": 1} and sampler.compile_count() == 2
    sampler.sample(params, PROMPTS[:2], temperature=1.0, key=jax.random.key(5), **kw)  # new P: one more each
    assert sampler.compile_counts() == {"prefill": 2, "decode": 2}


def test_sharded_equals_unsharded(tiny, sampler):
    """8 virtual devices as data 2 x fsdp 2 x tensor 2 (rows over data*fsdp, kv heads over tensor), with the
    cache grown in phases (2, 4, 6 steps), against the single-device single-phase sampler."""
    _, graphdef, params, cfg = tiny
    kw = dict(num_samples=4, max_new_tokens=6, temperature=1.0, top_p=0.9, eos_ids=[11], key=jax.random.key(6))
    prompts = PROMPTS[:2]
    ref = sampler.sample(params, prompts, **kw)
    mesh = parallel.make_mesh(2, 2, 2)
    sharded = Sampler(graphdef, cfg, mesh=mesh, phase_start=2, max_phases=3)
    out = sharded.sample(parallel.shard_params(params, mesh), prompts, **kw)
    assert out.tokens.sharding.spec[0] is not None  # rows are split over the batch axes
    for name in ("tokens", "mask", "lengths", "truncated", "prompt_index"):
        np.testing.assert_array_equal(getattr(out, name), getattr(ref, name), err_msg=name)
    np.testing.assert_allclose(out.logprobs, ref.logprobs, atol=1e-5)


@pytest.mark.parametrize("prompts,kw,match", [
    ([], {}, "prompts is empty"),
    ([[1, 2], []], {}, "prompt 1 is empty"),
    ([[1] * 257], {}, "longer than the largest bucket 256"),
    ([[1] * 250], {"max_new_tokens": 10}, "exceeds the model context 256"),
    ([[1, VOCAB]], {}, "outside the vocabulary"),
    ([[1]], {"num_samples": 0}, "num_samples must be >= 1"),
    ([[1]], {"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
    ([[1]], {"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
    ([[1]], {"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
    ([[1]], {"temperature": -1.0}, "temperature must be >= 0"),
    ([[1]], {"top_k": -2}, "top_k must be >= 0"),
    ([[1]], {"eos_ids": [VOCAB]}, "eos_ids must be"),
])
def test_bad_input_raises_before_compiling(tiny, prompts, kw, match):
    _, graphdef, params, cfg = tiny
    sampler = Sampler(graphdef, cfg)
    with pytest.raises(ValueError, match=match):
        sampler.sample(params, prompts, **{"num_samples": 1, "max_new_tokens": 4, "key": jax.random.key(0), **kw})
    assert sampler.compile_counts() == {"prefill": 0, "decode": 0}


def test_decode_phases_do_not_change_results(tiny, sampler):
    """A cache grown in phases (4, 8, 12 steps) gives the same rollouts as one full-length loop."""
    _, graphdef, params, cfg = tiny
    kw = dict(num_samples=2, max_new_tokens=12, temperature=1.0, eos_ids=[11, 12], key=jax.random.key(7))
    phased = Sampler(graphdef, cfg, phase_start=4, max_phases=3)
    a, b = phased.sample(params, PROMPTS, **kw), sampler.sample(params, PROMPTS, **kw)
    for name in ("tokens", "mask", "lengths", "truncated"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
    assert decode_phases(12, 4, 3) == (4, 8, 12) and decode_phases(128) == (32, 64, 128)
    assert decode_phases(4096) == (512, 1024, 2048, 4096) and decode_phases(1) == (1,)


def test_unrolled_layer_stack_samples_the_same(tiny, sampler):
    """scan_layers=False (one cache array per layer, the CPU trainer's default) gives the same rollouts,
    sharded over data 2 x fsdp 2 x tensor 2 and grown in phases."""
    _, graphdef, params, cfg = tiny
    unrolled = dataclasses.replace(cfg, scan_layers=False)
    graphdef_u, _ = split(nnx.eval_shape(lambda: Transformer(unrolled)))
    kw = dict(num_samples=3, max_new_tokens=9, temperature=1.0, top_p=0.95, eos_ids=[11], key=jax.random.key(8))
    ref = sampler.sample(params, PROMPTS, **kw)
    mesh = parallel.make_mesh(2, 2, 2)
    unrolled_sampler = Sampler(graphdef_u, unrolled, mesh=mesh, phase_start=3, max_phases=3, layers="model")
    assert not unrolled_sampler.cfg.scan_layers
    out = unrolled_sampler.sample(parallel.shard_params(params, mesh), PROMPTS[:2] + PROMPTS[2:], **kw)
    for name in ("tokens", "mask", "lengths", "truncated"):
        np.testing.assert_array_equal(getattr(out, name), getattr(ref, name), err_msg=name)
    np.testing.assert_allclose(out.logprobs, ref.logprobs, atol=1e-5)


def test_layers_option_picks_the_stack_and_keeps_the_rollouts(tiny):
    """layers="scan" / "unrolled" run a Transformer either way on the same (stacked) parameters with the same
    rollouts; "auto" scans on CPU; a bad value is one clear error."""
    _, graphdef, params, cfg = tiny
    kw = dict(num_samples=2, max_new_tokens=5, temperature=1.0, key=jax.random.key(9))
    outs = {}
    for layers, scanned in (("scan", True), ("unrolled", False), ("auto", True)):
        s = Sampler(graphdef, cfg, layers=layers)
        assert s.cfg.scan_layers is scanned
        outs[layers] = s.sample(params, PROMPTS, **kw)
    for other in ("unrolled", "auto"):
        np.testing.assert_array_equal(outs[other].tokens, outs["scan"].tokens)
        np.testing.assert_allclose(outs[other].logprobs, outs["scan"].logprobs, atol=1e-5)
    with pytest.raises(ValueError, match="layers must be"):
        Sampler(graphdef, cfg, layers="fast")
