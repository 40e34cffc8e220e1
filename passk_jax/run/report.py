"""End-of-run report: ``report.md`` plus PNG plots of the training curves and of pass@k versus k before
and after RL, built from the files the trainer leaves in the workdir (metrics.jsonl, eval_*.json)."""
from __future__ import annotations

import json
import os
import re
from typing import Any

from passk_jax.run import samples
from passk_jax.run.metric_log import read_jsonl
from passk_jax.run.spec import RunSpec

CURVES = (("rollout/reward_mean", "mean reward of the rollouts"),
          ("step/rollout_pass@k", "group pass@k of the rollouts"),
          ("step/entropy", "policy entropy (nats/token)"),
          ("rollout/length_mean", "response length (tokens)"))


def _load(path: str) -> dict[str, float]:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def pass_at_k_table(evals: dict[str, dict[str, float]], metric: str = "pass@"
                    ) -> tuple[list[int], dict[str, dict[int, float]]]:
    """ks present in every eval and {eval name: {k: value}} for the overall (all-source) numbers of
    ``metric`` ("pass@": pass@k; "pass^": pass^k, all k samples correct)."""
    pat = re.compile(rf"^eval/{re.escape(metric)}(\d+)$")
    table = {name: {int(m.group(1)): v for key, v in ev.items() if (m := pat.match(key))}
             for name, ev in evals.items()}
    ks = sorted(set.intersection(*(set(t) for t in table.values()))) if table else []
    return ks, table


def plot_curves(records: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(CURVES), figsize=(4 * len(CURVES), 3.2))
    for ax, (key, title) in zip(axes, CURVES):
        pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        if pts:
            ax.plot(*zip(*pts), lw=1.5)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_pass_at_k(ks: list[int], table: dict[str, dict[int, float]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, vals in table.items():
        ax.plot(ks, [vals[k] for k in ks], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k")
    ax.set_ylabel("held-out pass@k (unbiased)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(workdir: str, spec: RunSpec) -> str:
    """Write report.md (+ training_curves.png, pass_at_k.png) into ``workdir``; returns the report path."""
    evals = {name: ev for name, ev in (("before RL", _load(os.path.join(workdir, "eval_initial.json"))),
                                       ("after RL", _load(os.path.join(workdir, "eval_final.json")))) if ev}
    records = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    ks, table = pass_at_k_table(evals)
    plot_curves([r for r in records if "rollout/reward_mean" in r], os.path.join(workdir, "training_curves.png"))
    if ks:
        plot_pass_at_k(ks, table, os.path.join(workdir, "pass_at_k.png"))
    step_cfg = spec.step
    lines = [
        "# passk_jax run report", "",
        f"- task: `{spec.task.name}`; model: `{spec.model.hf_path or spec.model.preset}`",
        f"- estimator: `{step_cfg.estimator}` (k = {step_cfg.k}); N_rollout = {spec.rollout.num_samples}; "
        f"prompts per step = {spec.rollout.prompts_per_step}; RL steps = {spec.total_steps}",
        f"- evaluation: {spec.eval.num_prompts} held-out prompts x {spec.eval.num_samples} samples, "
        f"temperature {spec.eval.temperature}, top-p {spec.eval.top_p}; unbiased pass@k", "",
        "## Held-out pass@k and pass^k", "",
        "pass@k: at least one of k samples correct; pass^k: all k correct (both unbiased, from the same samples).",
        "", "| | " + " | ".join(f"k={k}" for k in ks) + " | greedy |",
        "|---|" + "---|" * (len(ks) + 1),
    ]
    hat = pass_at_k_table(evals, "pass^")[1]
    for name, vals in table.items():
        greedy = evals[name].get("eval/greedy_accuracy")
        lines.append(f"| {name}: pass@k | " + " | ".join(f"{vals[k]:.3f}" for k in ks)
                     + (f" | {greedy:.3f} |" if greedy is not None else " | — (eval.greedy off) |"))
        if all(k in hat.get(name, {}) for k in ks):
            lines.append(f"| {name}: pass^k | " + " | ".join(f"{hat[name][k]:.3f}" for k in ks) + " | |")
    sources = sorted({key.split("/")[1] for ev in evals.values() for key in ev
                      if key.count("/") == 2 and key.startswith("eval/") and "/pass@" in key})
    if sources and ks:
        lines += ["", "## Per data source (pass@1 / pass@%d)" % ks[-1], "", "| source | " +
                  " | ".join(evals) + " |", "|---|" + "---|" * len(evals)]
        for src in sources:
            cells = [f"{ev.get(f'eval/{src}/pass@1', float('nan')):.3f} / "
                     f"{ev.get(f'eval/{src}/pass@{ks[-1]}', float('nan')):.3f}" for ev in evals.values()]
            lines.append(f"| {src} | " + " | ".join(cells) + " |")
    train_recs = [r for r in records if "rollout/reward_mean" in r]
    if train_recs:
        first, last = train_recs[0], train_recs[-1]
        lines += ["", "## Training", "",
                  f"- rollout reward: {first['rollout/reward_mean']:.3f} (step {first['step']}) -> "
                  f"{last['rollout/reward_mean']:.3f} (step {last['step']})",
                  f"- entropy: {first.get('step/entropy', float('nan')):.3f} -> "
                  f"{last.get('step/entropy', float('nan')):.3f}",
                  f"- mean step time: {sum(r.get('time/step', 0) for r in train_recs) / len(train_recs):.2f} s",
                  "", "![training curves](training_curves.png)"]
    if ks:
        lines += ["", "![pass@k](pass_at_k.png)"]
    final_samples = [r for r in samples.read(samples.path_of(workdir, spec.total_steps)) if r.get("phase") == "eval"]
    if final_samples:
        lines += ["", "## Samples of the final evaluation", "",
                  "All recorded samples: `samples/step_<N>.jsonl`.", "", samples.markdown(final_samples)]
    path = os.path.join(workdir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path
