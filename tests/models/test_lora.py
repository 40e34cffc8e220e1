"""LoRA adapters: the base model exactly at B = 0, merged = unmerged, PEFT's own loader gives our logits, and
one sentence per bad field."""
import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from passk_jax import parallel
from passk_jax.models import hf, lora as L
from passk_jax.models import transformer as T

CFG = dataclasses.replace(T.ModelConfig.tiny(vocab_size=64), num_layers=2, scan_layers=True)


def _batch(B=3, S=10, seed=0):
    rng = np.random.default_rng(seed)
    tokens = jnp.asarray(rng.integers(0, 64, (B, S)), jnp.int32)
    mask = np.ones((B, S), bool)
    mask[1, :3] = False
    positions = jnp.asarray(np.maximum(np.cumsum(mask, 1) - 1, 0), jnp.int32)
    return tokens, positions, jnp.asarray(mask)


def _random_b(adapters, seed=1, scale=0.05):
    """The same adapters with a random (non-zero) B, as after training."""
    keys = iter(jax.random.split(jax.random.PRNGKey(seed), 64))
    return jax.tree_util.tree_map_with_path(
        lambda path, x: (scale * jax.random.normal(next(keys), x.shape, x.dtype)
                         if "lora_b" in jax.tree_util.keystr(path) else x), adapters)


_forward = jax.jit(T.forward, static_argnums=0)


@pytest.mark.parametrize("scan", [True, False])
def test_zero_b_is_the_base_model_and_merged_equals_unmerged(scan):
    cfg = dataclasses.replace(CFG, scan_layers=scan)
    graphdef, params = T.init(cfg, seed=0)
    lcfg = L.LoraConfig(rank=4, alpha=8.0)
    adapters = L.init_adapters(cfg, lcfg, jax.random.PRNGKey(3))
    batch = _batch()
    base, _ = _forward(graphdef, params, *batch)
    at_zero, _ = _forward(graphdef, L.LoraParams(params, adapters, lcfg.scale), *batch)
    chex.assert_trees_all_equal(at_zero, base)  # x W + s (x A) 0 == x W exactly
    trained = _random_b(adapters)
    lp = L.LoraParams(params, trained, lcfg.scale)
    unmerged, _ = _forward(graphdef, lp, *batch)
    merged, _ = _forward(graphdef, L.merged(lp), *batch)
    assert float(jnp.max(jnp.abs(unmerged - base))) > 1e-3  # the adapters do something
    chex.assert_trees_all_close(merged, unmerged, atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_equal_structs(L.merged(lp), params)  # same tree, no adapter leaves


def test_targets_subset_and_shapes():
    lcfg = L.LoraConfig(rank=2, alpha=4.0, targets=("q", "o", "down"))
    adapters = L.init_adapters(CFG, lcfg, jax.random.PRNGKey(0))
    assert sorted(adapters) == ["down_proj", "o_proj", "q_proj"]
    Lr, D, H, hd, F = CFG.num_layers, CFG.hidden_size, CFG.num_heads, CFG.head_dim, CFG.intermediate_size
    chex.assert_shape(adapters["q_proj"]["lora_a"][...], (Lr, D, 2))
    chex.assert_shape(adapters["q_proj"]["lora_b"][...], (Lr, 2, H, hd))
    chex.assert_shape(adapters["o_proj"]["lora_a"][...], (Lr, H, hd, 2))
    chex.assert_shape(adapters["down_proj"]["lora_b"][...], (Lr, 2, D))
    assert float(jnp.max(jnp.abs(adapters["down_proj"]["lora_a"][...]))) <= 1 / np.sqrt(F)


@pytest.mark.parametrize("kwargs,match", [
    (dict(rank=0), "lora_rank must be an integer >= 1"),
    (dict(rank=True), "lora_rank must be an integer >= 1"),
    (dict(rank=4, alpha=0.0), "lora_alpha must be a finite number > 0"),
    (dict(rank=4, targets=("q", "qkv")), r"'qkv' is not a projection of the decoder"),
    (dict(rank=4, targets=()), "lora_targets must be distinct names"),
    (dict(rank=4, targets=("q", "q")), "lora_targets must be distinct names"),
])
def test_bad_lora_config_is_one_sentence(kwargs, match):
    with pytest.raises(ValueError, match=match):
        L.LoraConfig(**kwargs)


def test_rank_larger_than_a_matrix_is_refused():
    cfg = dataclasses.replace(CFG, num_kv_heads=1, head_dim=8, num_heads=2, hidden_size=64)  # k_proj: 64 x 8
    with pytest.raises(ValueError, match=r"model.lora_rank=9 is larger than the k_proj matrix allows \(64 x 8"):
        L.init_adapters(cfg, L.LoraConfig(rank=9), jax.random.PRNGKey(0))


def test_sharded_lora_forward_equals_one_device():
    graphdef, params = T.init(CFG, seed=0)
    lcfg = L.LoraConfig(rank=4)
    adapters = _random_b(L.init_adapters(CFG, lcfg, jax.random.PRNGKey(3)))
    batch = _batch(B=8)
    ref, _ = _forward(graphdef, L.LoraParams(params, adapters, lcfg.scale), *batch)
    for shape in ((2, 2, 2), (2, 4, 1)):
        mesh = parallel.make_mesh(*shape)
        sharded = L.LoraParams(parallel.shard_params(params, mesh), parallel.shard_params(adapters, mesh),
                               lcfg.scale)
        with jax.set_mesh(mesh):
            out, _ = _forward(graphdef, sharded, *batch)
        chex.assert_trees_all_close(out, ref, atol=1e-5, rtol=1e-5)


def test_peft_loads_our_adapters_and_gives_our_logits(tmp_path):
    """Our adapters written as a PEFT directory, loaded by ``peft.PeftModel.from_pretrained`` onto the
    transformers base model: the same logits as our unmerged forward (every target, Qwen2 with biases)."""
    peft = pytest.importorskip("peft")
    hf_cfg = transformers.Qwen2Config(vocab_size=120, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      tie_word_embeddings=False)
    torch.manual_seed(0)
    base_torch = transformers.AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="eager").eval()
    base_dir = tmp_path / "base"
    base_torch.save_pretrained(base_dir)
    model, cfg = hf.load_pretrained(base_dir)
    graphdef, params = T.split(model)
    lcfg = L.LoraConfig(rank=4, alpha=16.0)
    adapters = _random_b(L.init_adapters(cfg, lcfg, jax.random.PRNGKey(5)), scale=0.1)
    L.save_peft(str(tmp_path / "adapter"), adapters, cfg, lcfg, base_path=str(base_dir))
    tuned = peft.PeftModel.from_pretrained(base_torch, str(tmp_path / "adapter")).eval()
    tokens = np.random.default_rng(0).integers(0, 120, (2, 9))
    with torch.no_grad():
        ref = tuned(input_ids=torch.tensor(tokens)).logits.float().numpy()
    pos = np.broadcast_to(np.arange(9), tokens.shape)
    ours, _ = _forward(graphdef, L.LoraParams(params, adapters, lcfg.scale), jnp.asarray(tokens, jnp.int32),
                       jnp.asarray(pos, jnp.int32), jnp.ones(tokens.shape, bool))
    base_logits, _ = _forward(graphdef, params, jnp.asarray(tokens, jnp.int32), jnp.asarray(pos, jnp.int32),
                              jnp.ones(tokens.shape, bool))
    assert float(np.abs(np.asarray(base_logits) - ref).max()) > 1e-2  # the adapters moved the logits
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4)
