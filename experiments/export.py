"""Export the latest policy of a run as a Hugging Face checkpoint:

    python -m experiments.export --workdir=runs/passk_k4 --out=/path/to/hf_dir [--step=N]

Writes config.json, model.safetensors and the tokenizer, loadable by
transformers.AutoModelForCausalLM.from_pretrained (and by vLLM). A LoRA run (model.lora_rank > 0) is written
merged, plus its adapters as a PEFT directory <out>/peft_adapter for peft.PeftModel.from_pretrained.
"""
from __future__ import annotations

import json
import os

from absl import app, flags

from experiments import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Run directory (holds config.json and checkpoints/).", required=True)
flags.DEFINE_string("out", None, "Output Hugging Face directory.", required=True)
flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest readable one).")


def export_run(workdir: str, out: str, step: int | None = None) -> int:
    """Restore a run's params from its checkpoint and write them as an HF checkpoint; returns the step."""
    from passk_jax import parallel
    from passk_jax.run import state as run_state, trainer
    from passk_jax.run.checkpoint import Checkpointer
    from passk_jax.run.spec import RunSpec

    cfg_path = os.path.join(workdir, "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{workdir} has no config.json; is it a passk_jax run directory?")
    with open(cfg_path) as f:
        spec = RunSpec.from_json(json.load(f))
    mesh = parallel.make_mesh(data=spec.mesh.data, fsdp=spec.mesh.fsdp, tensor=spec.mesh.tensor)
    graphdef, params, model_cfg, tokenizer = trainer.build_model(spec, mesh, workdir)
    params = trainer.with_adapters(spec, model_cfg, params, mesh)  # LoRA: the base + adapters to restore into
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    target = run_state.restore_target(spec, mesh, params)
    try:
        if step is None:
            found = ckpt.restore_latest(target)
            if found is None:
                raise FileNotFoundError(f"no readable checkpoint in {ckpt.directory}.")
            step, tree, meta = found
        else:
            if step not in ckpt.steps():
                raise FileNotFoundError(f"checkpoint step {step} not in {ckpt.directory} (have {ckpt.steps()}).")
            tree, meta = ckpt.restore(step, target)
    finally:
        ckpt.close()
    base = trainer.base_identity(spec, model_cfg) if spec.model.lora is not None else None
    if not trainer.same_base(meta.get("lora_base"), base):
        raise ValueError(trainer.base_mismatch(workdir, meta.get("lora_base"), base))
    trainer.export(graphdef, run_state.state_from_tree(tree, params).params, model_cfg, tokenizer, out,
                   hf_path=spec.model.hf_path or None, lora_cfg=spec.model.lora)
    return step


@cli.one_line_errors
def main(argv):
    del argv
    cli.show_progress_messages()
    step = export_run(FLAGS.workdir, FLAGS.out, FLAGS.step)
    print(f"exported step {step} of {FLAGS.workdir} to {FLAGS.out}")


if __name__ == "__main__":
    app.run(main, flags_parser=cli.flags_parser)
