"""HF checkpoint import/export: logits parity with transformers' PyTorch models, round trip, errors."""
import json
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from flax import nnx

from passk_jax import parallel
from passk_jax.models import hf
from passk_jax.models import transformer as T

COMMON = dict(vocab_size=200, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512)
HF_CONFIGS = {
    "qwen2_tied": lambda: transformers.Qwen2Config(**COMMON, tie_word_embeddings=True, rope_theta=1e6),
    "qwen2_untied_mqa": lambda: transformers.Qwen2Config(**{**COMMON, "num_key_value_heads": 1},
                                                         tie_word_embeddings=False),
    "qwen3": lambda: transformers.Qwen3Config(**COMMON, head_dim=24, tie_word_embeddings=False),
    "llama3": lambda: transformers.LlamaConfig(
        **COMMON, tie_word_embeddings=False, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64}),
    "llama3_tied": lambda: transformers.LlamaConfig(
        **COMMON, tie_word_embeddings=True, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64}),
}
FAMILY = {"qwen2_tied": "qwen2", "qwen2_untied_mqa": "qwen2", "qwen3": "qwen3", "llama3": "llama",
          "llama3_tied": "llama"}
B, S = 3, 12


def _batch():
    """Left-padded rows with per-row position offsets (positions computed from the mask)."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, COMMON["vocab_size"], (B, S))
    mask = np.ones((B, S), bool)
    mask[1, :4] = False
    mask[2, :7] = False
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0) + np.array([0, 40, 300])[:, None]
    return tokens, positions, mask


def _hf_logits(model, tokens, positions, mask):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask.astype(np.int64)),
                    position_ids=torch.tensor(positions))
    return out.logits.float().numpy()


_forward = jax.jit(T.forward, static_argnums=0)


def _our_logits(model, tokens, positions, mask):
    graphdef, params = T.split(model)
    logits, _ = _forward(graphdef, params, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(mask))
    return np.asarray(logits)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """checkpoint(name) -> (dir, reference logits) for a random HF model with perturbed norms and biases,
    built once per module."""
    cache = {}

    def build(name):
        if name not in cache:
            torch.manual_seed(0)
            model = transformers.AutoModelForCausalLM.from_config(HF_CONFIGS[name](),
                                                                  attn_implementation="eager").eval()
            with torch.no_grad():
                for pname, p in model.named_parameters():
                    if "norm" in pname or "bias" in pname:
                        p.add_(0.1 * torch.randn_like(p))
            path = tmp_path_factory.mktemp(name)
            model.save_pretrained(path)
            cache[name] = path, _hf_logits(model, *_batch())
        return cache[name]

    return build


def test_parity_with_unrolled_layers(checkpoint):
    name = sorted(HF_CONFIGS)[0]
    path, ref = checkpoint(name)
    tokens, positions, mask = _batch()
    model, cfg = hf.load_pretrained(path, scan_layers=False)
    assert not cfg.scan_layers
    assert np.abs(_our_logits(model, tokens, positions, mask) - ref)[mask].max() <= 1e-4


@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_parity_and_export_round_trip(checkpoint, name, tmp_path):
    path, ref = checkpoint(name)
    tokens, positions, mask = _batch()
    model, cfg = hf.load_pretrained(path)
    assert cfg.family == FAMILY[name]
    ours = _our_logits(model, tokens, positions, mask)
    err = np.abs(ours - ref)[mask].max()
    print(f"{name}: max |logits - HF| = {err:.2e}")
    assert err <= 1e-4

    hf.save_pretrained(model, cfg, tmp_path / "export")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export", attn_implementation="eager").eval()
    assert type(back).__name__ == json.loads((path / "config.json").read_text())["architectures"][0]
    assert np.abs(_hf_logits(back, tokens, positions, mask) - ref)[mask].max() <= 1e-4
    again, cfg2 = hf.load_pretrained(tmp_path / "export")
    assert cfg2 == cfg
    np.testing.assert_array_equal(_our_logits(again, tokens, positions, mask), ours)


def test_sharded_checkpoint_and_mesh_placement(checkpoint, tmp_path):
    path, ref = checkpoint("qwen3")
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    mesh = parallel.make_mesh(data=1, fsdp=4, tensor=2)
    ours, _ = hf.load_pretrained(tmp_path, mesh=mesh)
    q = ours.layers.q_proj[...]
    assert q.sharding == parallel.logical_sharding(mesh, ("layers", "embed", "heads", "head_dim"), q.shape)
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert {s.data.shape for s in q.addressable_shards} == {(2, 16, 2, 24)}
    tokens, positions, mask = _batch()
    assert np.abs(_our_logits(ours, tokens, positions, mask) - ref)[mask].max() <= 1e-4
    # saving sharded params gathers them back to exactly the original tensors
    hf.save_pretrained(ours, hf.config_from_hf(json.loads((path / "config.json").read_text())), tmp_path / "out")
    saved = safetensors.numpy.load_file(tmp_path / "out" / "model.safetensors")
    original = safetensors.numpy.load_file(path / "model.safetensors")
    assert saved.keys() == original.keys()
    for name, value in original.items():
        np.testing.assert_array_equal(saved[name], value, err_msg=name)


def test_bfloat16_checkpoint_loads_exactly(tmp_path):
    torch.manual_seed(1)
    model = transformers.AutoModelForCausalLM.from_config(HF_CONFIGS["qwen2_tied"]()).to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    ours, cfg = hf.load_pretrained(tmp_path, dtype="bfloat16")
    assert cfg.dtype == "bfloat16" and ours.embed_tokens[...].dtype == jnp.float32
    want = model.model.layers[1].self_attn.o_proj.weight.detach().float().numpy()  # [D, H*hd]
    got = np.asarray(ours.layers.o_proj[...][1])  # [H, hd, D]
    np.testing.assert_array_equal(got.reshape(-1, got.shape[-1]).T, want)


def test_save_from_split_with_bf16_weights_and_extra_config(checkpoint, tmp_path):
    path, _ = checkpoint("llama3")
    model, cfg = hf.load_pretrained(path)
    extra = json.loads((path / "config.json").read_text())
    hf.save_pretrained(T.split(model), cfg, tmp_path, dtype="bfloat16", extra_config=extra)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["eos_token_id"] == extra["eos_token_id"] and saved["dtype"] == "bfloat16"
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert back.model.embed_tokens.weight.dtype == torch.bfloat16
    want = np.asarray(model.embed_tokens[...]).astype(jnp.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(back.model.embed_tokens.weight.detach().float().numpy(), want)


def test_config_round_trip_both_rope_formats():
    legacy = {"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
              "num_hidden_layers": 1, "num_attention_heads": 2, "rope_theta": 5e5,
              "rope_scaling": {"type": "linear", "factor": 2.0}}
    cfg = hf.config_from_hf(legacy)
    assert cfg.rope_theta == 5e5 and cfg.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert cfg.num_kv_heads == 2 and cfg.head_dim == 4 and cfg.family == "llama"
    assert hf.config_from_hf(hf.config_to_hf(cfg)) == cfg
    qwen3 = {"model_type": "qwen3", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
             "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
             "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}
    cfg3 = hf.config_from_hf(qwen3)
    assert cfg3.qk_norm and not cfg3.attention_bias and cfg3.head_dim == 128 and cfg3.rope_scaling is None


# ------------------------------------------------------------------ errors
def test_missing_config_and_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        hf.load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Qwen2ForCausalLM"], **COMMON}))
    with pytest.raises(FileNotFoundError, match=r"no \*.safetensors"):
        hf.load_pretrained(tmp_path)


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], **COMMON}))
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*Qwen2ForCausalLM, Qwen3ForCausalLM, LlamaForCausalLM"):
        hf.load_pretrained(tmp_path)
    with pytest.raises(ValueError, match="sliding"):
        hf.config_from_hf({"architectures": ["Qwen2ForCausalLM"], "use_sliding_window": True, **COMMON})
    with pytest.raises(ValueError, match="yarn"):
        hf.config_from_hf({"architectures": ["Qwen2ForCausalLM"], **COMMON,
                           "rope_scaling": {"type": "yarn", "factor": 4.0}})


def test_missing_unexpected_and_misshapen_tensors(checkpoint, tmp_path):
    path, _ = checkpoint("qwen2_untied_mqa")
    tensors = safetensors.numpy.load_file(path / "model.safetensors")
    bad = dict(tensors)
    del bad["model.layers.1.self_attn.k_proj.bias"], bad["lm_head.weight"]
    bad["model.layers.1.self_attn.extra.weight"] = np.zeros(3, np.float32)
    shutil.copy(path / "config.json", tmp_path / "config.json")
    safetensors.numpy.save_file(bad, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing tensors \[lm_head.weight, model.layers.1.self_attn.k_proj.bias\] "
                                         r"and unexpected tensors \[model.layers.1.self_attn.extra.weight\]"):
        hf.load_pretrained(tmp_path)

    config = json.loads((path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "intermediate_size": 80}))
    safetensors.numpy.save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"shapes do not match.*model.layers.0.mlp.gate_proj.weight \(96, 64\) "
                                         r"\(expected \(80, 64\)\)"):
        hf.load_pretrained(tmp_path)


def test_truncated_or_corrupt_safetensors_names_the_file(checkpoint, tmp_path, monkeypatch):
    path, _ = checkpoint("qwen2_tied")
    shutil.copy(path / "config.json", tmp_path / "config.json")
    data = (path / "model.safetensors").read_bytes()
    weights = tmp_path / "model.safetensors"

    def no_arrays(*args, **kwargs):
        raise AssertionError("a parameter was read before the weight file was checked")

    monkeypatch.setattr(jax, "make_array_from_callback", no_arrays)
    header_len = int.from_bytes(data[:8], "little")
    for blob, needle in [(data[:len(data) // 2], "its header describes .* bytes of tensor data but the file holds"),
                         (data[:5], "unreadable safetensors header"),
                         (data[:8 + header_len // 2], "unreadable safetensors header"),
                         (data[:8] + b"{not json" + data[17:], "unreadable safetensors header")]:
        weights.write_bytes(blob)
        with pytest.raises(ValueError, match=f"^weight file {re.escape(str(weights))} is truncated or corrupt: "
                                             f"{needle}.*; re-copy or re-export the checkpoint.$"):
            hf.load_pretrained(tmp_path)
    header = json.loads(data[8:8 + header_len])
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = [2 * d for d in header[name]["shape"]]
    blob = json.dumps(header).encode()
    weights.write_bytes(len(blob).to_bytes(8, "little") + blob + data[8 + header_len:])
    with pytest.raises(ValueError, match=f"truncated or corrupt: tensor {name} spans .* bytes but its shape"):
        hf.load_pretrained(tmp_path)


def test_export_rejects_configs_without_hf_equivalent():
    cfg = T.ModelConfig(vocab_size=10, hidden_size=8, intermediate_size=16, num_layers=1, num_heads=2,
                        num_kv_heads=1, family="llama", attention_bias=True)
    with pytest.raises(ValueError, match="no Hugging Face equivalent"):
        hf.config_to_hf(cfg)


# ------------------------------------------------------------------ tokenizer
def test_load_tokenizer_local_with_chat_template(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<unk>", "<eos>", "user", "assistant", ":", "hi", "there"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")
    fast.chat_template = "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
    fast.save_pretrained(tmp_path)
    loaded = hf.load_tokenizer(tmp_path)
    text = loaded.apply_chat_template([{"role": "user", "content": "hi there"}], tokenize=False)
    assert text.strip() == "user : hi there"
    assert loaded("hi there")["input_ids"] == [5, 6]
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        hf.load_tokenizer(tmp_path / "nowhere")


@pytest.mark.parametrize("name", ["qwen2_tied", "qwen3"])
def test_params_stay_float32_and_state_is_params_only(checkpoint, name):
    path, _ = checkpoint(name)
    model, cfg = hf.load_pretrained(path, dtype="bfloat16")
    graphdef, params = T.split(model)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    assert sum(x.size for x in jax.tree.leaves(params)) == cfg.num_params()
    assert set(nnx.to_flat_state(nnx.state(model, nnx.Not(nnx.Param)))) == set()
