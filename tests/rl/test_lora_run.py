"""LoRA runs end to end on a tiny Hugging Face base: a resumed run equals an uninterrupted one bitwise, the
checkpoints hold the adapters only, both exports (merged and PEFT) give the same logits in transformers,
a checkpoint refuses another base, and a decode copy that misses the adapters stops the run."""
import json
import os
import shutil

import chex
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from passk_jax import parallel
from passk_jax.run import trainer
from passk_jax.run.spec import RunSpec
from passk_jax.sampling import Sampler
from tests.rl.test_trainer import tiny_config

LORA = {"model.lora_rank": 4, "model.lora_alpha": 8.0, "sft.steps": 0, "train.steps": 2, "train.eval_every": 0,
        "train.samples_every": 0, "eval.num_prompts": 2, "eval.num_samples": 2, "eval.greedy": False,
        "step.learning_rate": 3e-2}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A fresh tiny model exported as a Hugging Face directory (weights + the character tokenizer)."""
    root = tmp_path_factory.mktemp("lora_base")
    spec = RunSpec.from_config(tiny_config(root / "cache", **{"sft.steps": 0}))
    mesh = parallel.make_mesh(spec.mesh.data, spec.mesh.fsdp, spec.mesh.tensor)
    graphdef, params, cfg, tokenizer = trainer.build_model(spec, mesh, str(root))
    trainer.export(graphdef, params, cfg, tokenizer, str(root / "hf"))
    return str(root / "hf")


def _spec(tmp_path, base, **extra):
    return RunSpec.from_config(tiny_config(tmp_path / "cache", **{**LORA, "model.hf_path": base, **extra}))


def _saved(workdir, step):
    with ocp.PyTreeCheckpointer() as ckpt:
        return ckpt.restore(os.path.join(workdir, "checkpoints", str(step), "state"))


def test_lora_run_resumes_bitwise_and_both_exports_agree(tmp_path, base):
    """A LoRA run resumed after step 1 equals the uninterrupted one bitwise; its checkpoints hold the adapters
    only; the merged export and the PEFT adapter on the base agree in transformers; and once the base's
    weights change under the same path, the finished run's checkpoint refuses it (checked on restore)."""
    import torch
    import transformers
    from peft import PeftModel
    from safetensors.numpy import load_file, save_file

    mine = str(tmp_path / "base")  # a copy: its weights change at the end
    shutil.copytree(base, mine)
    full, split = str(tmp_path / "full"), str(tmp_path / "split")
    assert trainer.train(_spec(tmp_path, mine), full)["status"] == "done"
    assert trainer.train(_spec(tmp_path, mine), split, stop_after=1)["status"] == "stopped"
    assert trainer.train(_spec(tmp_path, mine), split)["status"] == "done"
    a, b = _saved(full, 2), _saved(split, 2)
    chex.assert_trees_all_equal(a, b)  # adapters, optimiser state, key: bitwise across the resume
    assert sorted(a["params"]) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert all(sorted(v) == ["lora_a", "lora_b"] for v in a["params"].values())  # no base weights stored
    assert max(float(np.abs(x).max()) for v in a["params"].values() for x in jax.tree.leaves(v["lora_b"])) > 0
    with open(os.path.join(full, "metrics.jsonl")) as f, open(os.path.join(split, "metrics.jsonl")) as g:
        ra, rb = ([{k: v for k, v in json.loads(line).items() if not k.startswith(("time", "perf/"))} for line in h]
                  for h in (f, g))
    assert ra == rb
    # the merged export and the PEFT adapter on the base give the same logits in transformers
    tokens = torch.tensor(np.random.default_rng(0).integers(4, 60, (2, 9)))
    merged = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(full, "hf_export"), dtype=torch.float32)
    base_model = transformers.AutoModelForCausalLM.from_pretrained(mine, dtype=torch.float32)
    with torch.no_grad():
        plain = base_model(input_ids=tokens).logits.numpy()
        tuned = PeftModel.from_pretrained(base_model, os.path.join(full, "hf_export", trainer.PEFT_DIR)).eval()
        via_peft = tuned(input_ids=tokens).logits.numpy()
        via_merged = merged(input_ids=tokens).logits.numpy()
    assert float(np.abs(via_merged - plain).max()) > 1e-4
    np.testing.assert_allclose(via_merged, via_peft, atol=1e-4)
    tensors = load_file(os.path.join(mine, "model.safetensors"))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1.0
    save_file(tensors, os.path.join(mine, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="holds LoRA adapters trained on base .* but this run's base"):
        trainer.train(_spec(tmp_path, mine), split)


def test_a_decode_copy_without_the_adapters_stops_the_run(tmp_path, base, monkeypatch):
    """The sampler keeps serving the first decode copy (as when adapters never reach the rollout engine):
    the run stops at the next step with one sentence."""
    first = {}
    real = Sampler.prepare

    def stale(self, params):
        if "w" not in first:
            first["w"] = real(self, params)
        return first["w"]

    monkeypatch.setattr(Sampler, "prepare", stale)
    with pytest.raises(RuntimeError, match="not merged from the current LoRA adapters: rollouts would sample a stale"):
        trainer.train(_spec(tmp_path, base, **{"train.export_hf": False}), str(tmp_path / "run"))
