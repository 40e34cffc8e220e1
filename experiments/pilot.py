"""Pilot: how well does a config's *initial* policy do on its held-out prompts? No training, no workdir.

    python -m experiments.pilot --config=smollm2_arith [--config.a.b=value ...] [--show=2] [--json=FILE]

Samples ``eval.num_samples`` responses for each of ``eval.num_prompts`` held-out prompts with the
evaluation settings, and prints one markdown row: pass@1, pass@k (k = the largest power of two up to
n_eval) with their standard errors, the share of prompts solved at least once and the share solved by some
but not all responses (where a group-relative advantage is non-zero), the share of responses
with no extractable answer, the mean length and the share cut at ``rollout.max_new_tokens``, and the
wall time. It is how a task and a model are matched before a run: Pass@k training has something to do
where pass@1 is low but pass@k is clearly higher (bench/RESULTS.md and experiments/PILOT_SMOLLM2.md).
``--show`` prints that many prompts with one response each.
"""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time

from absl import app, flags

from experiments import cli, configs

FLAGS = flags.FLAGS


def define_flags() -> None:
    flags.DEFINE_integer("show", 1, "Prompts to print with one of their responses.")
    flags.DEFINE_string("json", None, "Also write the row (and the settings) to this JSON file.")
    flags.DEFINE_string("label", "", "Label of the row (default: the task options).")


def pilot(spec, *, show: int = 1) -> tuple[dict, list]:
    """(row, samples): the initial policy's held-out results for ``spec`` (a RunSpec)."""
    import jax
    import numpy as np

    from passk_jax import parallel
    from passk_jax.rl import rollout
    from passk_jax.run import evaluation, samples, trainer
    from passk_jax.run.data import check_prompts, load_examples, make_task
    from passk_jax.sampling import Sampler
    from passk_jax.tasks.pool import VerifierPool

    task = make_task(spec.task)
    _, test = load_examples(spec, task)
    context, source = trainer.model_context(spec)
    scratch = tempfile.mkdtemp(prefix="pilot-")  # a fresh character model saves its tokenizer there
    try:
        tokenizer = trainer.run_tokenizer(spec, scratch)
        test = check_prompts(spec, task, tokenizer, context, source, {"test": test})[0]["test"]
        try:  # as the trainer: evaluations stop at EOS even when rollouts ignore it
            stops = rollout.checkpoint_stop_ids(tokenizer, spec.model.hf_path)
        except ValueError:
            if not spec.rollout.ignore_eos:
                raise
            stops = ()
        mesh = parallel.make_mesh(data=spec.mesh.data, fsdp=spec.mesh.fsdp, tensor=spec.mesh.tensor)
        t0 = time.perf_counter()
        graphdef, params, cfg, tokenizer = trainer.build_model(spec, mesh, scratch, tokenizer)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    sampler = Sampler(graphdef, cfg, mesh=mesh, pad_id=tokenizer.pad_token_id)
    e = spec.eval
    kept: list = []
    with VerifierPool(num_workers=spec.task.verifier_workers, timeout_s=spec.task.verifier_timeout_s) as pool:
        env = rollout.Env(sampler, task, tokenizer, pool, stops)
        t1 = time.perf_counter()
        out, per_prompt = evaluation.evaluate(
            env, params, test, num_samples=e.num_samples, max_new_tokens=spec.rollout.max_new_tokens,
            temperature=e.temperature, top_p=e.top_p, greedy=False, batch_prompts=e.sample_prompts,
            key=jax.random.fold_in(jax.random.PRNGKey(spec.seed), 2), on_rollouts=kept.append)
        counts, _ = pool.take_counts()
    r = kept[0]
    n = e.num_samples
    k = evaluation.powers_of_two(n)[-1]
    scored = counts.get("eval", {}).get("scored", 0)
    row = {"prompts": len(test), "n": n, "pass@1": out["eval/pass@1"], "pass@1_se": out["eval/pass@1_stderr"],
           f"pass@{k}": out[f"eval/pass@{k}"], f"pass@{k}_se": out[f"eval/pass@{k}_stderr"],
           "solved_any": float((per_prompt["correct"] > 0).mean()),
           # where a group-relative advantage is non-zero: some but not all of the n responses correct
           "solved_some": float(((per_prompt["correct"] > 0) & (per_prompt["correct"] < n)).mean()),
           "no_answer": counts.get("eval", {}).get("no_answer", 0) / max(scored, 1),
           "length_mean": float(r.lengths.mean()), "truncated": float(np.mean(r.truncated)),
           "load_s": t1 - t0, "eval_s": time.perf_counter() - t1}
    recs = samples.records(r, task, phase="eval", num_prompts=show, per_prompt=1) if show else []
    return row, recs


@cli.one_line_errors
def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from passk_jax.run import samples
    from passk_jax.run.spec import RunSpec

    cli.show_progress_messages()
    spec = RunSpec.from_config(configs.config_flag_value())
    row, recs = pilot(spec, show=FLAGS.show)
    print(f"load {row['load_s']:.0f} s, evaluation {row['eval_s']:.0f} s", file=sys.stderr)
    for rec in recs:
        print(samples.console(rec, 0), file=sys.stderr)
    shown = {k: v for k, v in spec.task.options.items() if k not in ("dataset", "config", "test_size")}
    label = FLAGS.label or json.dumps(shown, sort_keys=True, default=str)
    k = next((key for key in row if key.startswith("pass@") and key != "pass@1" and not key.endswith("_se")),
             "pass@1")
    print(f"| {label} | {row['prompts']} x {row['n']} | {row['pass@1']:.3f} ± {row['pass@1_se']:.3f} | "
          f"{row[k]:.3f} ± {row[k + '_se']:.3f} | {row['solved_any']:.2f} | {row['solved_some']:.2f} | "
          f"{row['no_answer']:.2f} | "
          f"{row['length_mean']:.1f} | {row['truncated']:.2f} | {row['eval_s']:.0f} s |")
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump({"label": label, "row": row, "config": spec.config_json}, f, indent=2)


if __name__ == "__main__":
    configs.define_config_flag()
    define_flags()
    app.run(main, flags_parser=cli.flags_parser)
