"""RESULTS.md of the SmolLM2 study from its records: per-method pass@k before and after training, the claims'
paired differences with their seed and prompt intervals and verdicts (``DESIGN.md``), and the CPU time."""
from __future__ import annotations

import json
import os

import numpy as np

from experiments.reproduce import claims, stats
from experiments.smollm2_study import study

def _labels(design: study.Design) -> dict[str, str]:
    return {"pass1": "Pass@1 (GRPO)", "passk_analytic": f"Pass@k analytical (k={design.k})"}


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _ci(ci: stats.Interval | None) -> str:
    if ci is None or np.isnan(ci.lo):
        return "—"
    return f"[{100 * ci.lo:+.1f}, {100 * ci.hi:+.1f}]"


def write(design: study.Design, records_dir: str = study.RECORDS) -> str:
    records = study.load_records(design, records_dir)
    labels = _labels(design)
    manifest = os.path.join(records_dir, design.name, "design.json")
    if records and not os.path.exists(manifest):
        raise FileNotFoundError(f"{manifest} is missing: the held-out prompts' sources are written there by --run.")
    sources = json.load(open(manifest))["sources"] if os.path.exists(manifest) else []
    lines = [f"# SmolLM2 study, design `{design.name}` (fingerprint {design.fingerprint()})", "",
             "Pre-registered in `experiments/smollm2_study/DESIGN.md`; regenerate with "
             "`python -m experiments.smollm2_study --report`. Numbers in % of held-out prompts; intervals are "
             "95% (seed: t over paired seeds; prompts: bootstrap over the held-out prompts).", ""]
    done = {(r["method"], r["seed"]) for r in records}
    lines.append(f"Runs recorded: {len(records)} of {len(design.methods) * design.seeds} "
                 f"({', '.join(f'{m} seed {s}' for m, s in sorted(done)) or 'none'}).")
    lines.append("")
    if records:
        n = records[0]["num_samples"]
        ks = [k for k in (1, 2, 4, 8, 16) if k <= n]
        lines += ["## Held-out pass@k before and after training (mean over seeds)", "",
                  "| method | seeds | step | " + " | ".join(f"pass@{k}" for k in ks) + " |",
                  "|---|---|---|" + "---|" * len(ks)]
        for method in design.methods:
            recs = [r for r in records if r["method"] == method]
            if not recs:
                continue
            for step in (0, design.steps):
                vals = [np.mean([claims.Metric(f"pass@{k}").value(r, step, sources) for r in recs]) for k in ks]
                lines.append(f"| {labels.get(method, method)} | {len(recs)} | {step} | "
                             + " | ".join(_pct(v) for v in vals) + " |")
        lines += ["", "## Verdicts (pre-registered rule: both intervals decide)", "",
                  "| claim | seeds | a − b (mean) | seed interval | prompt interval | verdict |",
                  "|---|---|---|---|---|---|"]
        for claim in study.CLAIMS:
            j = claims.judge(claim, records, sources)
            if j is None:
                continue
            lines.append(f"| {claim.text} | {len(j['seeds'])} | {100 * np.mean(j['diffs']):+.1f} | "
                         f"{_ci(j['seed_ci'])} | {_ci(j['maze_ci'])} | **{j['verdict']}** |")
        for method in design.methods:
            for name in study.RISES:
                j = study.rise(records, method, claims.Metric(name), sources)
                if j is None:
                    continue
                lines.append(f"| {j['metric'].name} rises under {labels.get(method, method)} (a = end, b = step 0) | "
                             f"{len(j['seeds'])} | {100 * (np.mean(j['after']) - np.mean(j['before'])):+.1f} | "
                             f"{_ci(j['seed_ci'])} | {_ci(j['prompt_ci'])} | **{j['verdict']}** |")
        wall = sum(r["wall_s"] for r in records)
        machines = sorted({r["machine"] for r in records})
        commits = sorted({r["commit"] for r in records})
        lines += ["", f"CPU time: {wall / 3600:.2f} h wall for {len(records)} runs on {'; '.join(machines)} "
                      f"(commits {', '.join(commits)})."]
        failed = {f"{r['method']} seed {r['seed']}": r["verifier_failures"] for r in records
                  if any(r.get("verifier_failures", {}).values())}
        unknown = [f"{r['method']} seed {r['seed']}" for r in records if "verifier_failures" not in r]
        lines += ["", "Verifier failures (timeouts or errors, scored 0): " + (
            "; ".join(f"{run}: {counts}" for run, counts in failed.items()) if failed else "none recorded") + (
            f" (not recorded by the older records of {', '.join(unknown)})" if unknown else "") + "."]
    path = os.path.join(records_dir, design.name, "RESULTS.md")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path
