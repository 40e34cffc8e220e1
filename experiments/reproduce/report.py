"""RESULTS.md: the exact analyses and the training study, from the ``analyses.json`` / ``study.json`` that
``analyses.run`` and ``study`` leave in the output directory (either may be absent)."""
from __future__ import annotations

import json
import math
import os
from typing import Any

from experiments.reproduce.analyses import PAPER_ARGMAX

# The paper's Table 7 (maze, Qwen2.5-7B-Instruct, average over sizes 7-21): (Pass@1, Pass@k) in percent.
PAPER_TABLE7 = {"pass1": (13.9, 14.4), "passk_full": (12.7, 24.7), "passk_bootstrap": (16.8, 26.7),
                "passk_analytic": (47.7, 65.0)}


def _load(path: str) -> dict[str, Any] | None:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _pm(stat, scale: float = 100.0, digits: int = 1) -> str:
    mean, se = stat
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    if se is None or (isinstance(se, float) and math.isnan(se)):
        return f"{mean * scale:.{digits}f}"
    return f"{mean * scale:.{digits}f} ± {se * scale:.{digits}f}"


# --------------------------------------------------------------------------------------------- analyses
def analyses_section(a: dict[str, Any]) -> list[str]:
    n = a["n"]
    out = ["## 1. Exact analyses (no training)", "",
           f"Computed with the library's estimators (`passk_jax.advantages`), N = {n} rollouts. "
           "Files: `eta.csv`, `eta.png`, `bootstrap_convergence.csv`, `bootstrap_convergence.png`, "
           "`advantage_table.csv`.", "",
           "### 1.1 Where the advantage mass goes: η(N_pos) = N_pos·|A_pos| + N_neg·|A_neg| (Section 4)", "",
           "| advantage | argmax N_pos | accuracy at the peak | peak η | paper | |",
           "|---|---|---|---|---|---|"]
    for label, r in a["eta_argmax"].items():
        paper = PAPER_ARGMAX.get(label)
        mark = "" if paper is None else ("reproduced" if paper == r["n_pos"] else "**differs**")
        paper_txt = "–" if paper is None else f"N_pos = {paper} ({paper / n:.1%})"
        out.append(f"| {label} | {r['n_pos']} | {r['accuracy']:.1%} | {r['eta']:.2f} | {paper_txt} | {mark} |")
    out += ["", "![eta](eta.png)", "",
            "Pass@1 puts most weight on prompts solved half the time; Pass@k moves the peak to harder prompts "
            "(N/k correct for k = 4, 8, 16) and gives almost nothing to easy ones; combination (Eq. 18) sits "
            "between Pass@1 and Pass@4; exceed (Eq. 17) peaks at N_pos = 1. The paper's text says the Pass@8 "
            "peak is at 25%; the computed peak is 12.5% (25% is k = 4's), as noted in `docs/paper.md` section 6.",
            "", "### 1.2 Bootstrap sampling converges to the analytical advantage", ""]
    boot = a["bootstrap"]
    gs = sorted({r["num_groups"] for r in boot})
    show = [g for g in gs if g in (gs[0], 32, 256, gs[-1])] or gs
    out.append("RMS error against `passk_analytic` over every (N_pos, response) at N = 32, mean ± sd over "
               f"{a['bootstrap_seeds']} seeds; G = number of bootstrap groups (the paper uses G = N = 32). The "
               "paper's sum (Eq. 6) is compared after scaling by N/(kG) (= sum/k at G = N).")
    out += ["", "| k | reduction | " + " | ".join(f"G = {g}" for g in show) + " |",
            "|---|---|" + "---|" * len(show)]
    for k in sorted({r["k"] for r in boot}):
        for reduce in ("mean", "sum"):
            cells = []
            for g in show:
                r = next(r for r in boot if (r["k"], r["reduce"], r["num_groups"]) == (k, reduce, g))
                cells.append(f"{r['rms_error_mean']:.3f} ± {r['rms_error_std']:.3f}")
            name = "mean" if reduce == "mean" else "sum × N/(kG)"
            out.append(f"| {k} | {name} | " + " | ".join(cells) + " |")
    out += ["", f"At the paper's G = N the bootstrap sum is ≈ {a['bootstrap_sum_slope_k4']:.2f} × the analytical "
            "advantage for k = 4 (least-squares slope; the paper: ≈ k×). The error falls like 1/√G once G ≳ N; "
            "below that many responses sit in no group (advantage 0) or in a single one, so the error is "
            "large and not monotone. At G = N the bootstrap advantage is still far from the analytical one "
            "(RMS ≈ 0.2-0.4 for advantages of order 1): the noise the paper's analytical derivation removes.",
            "", "![bootstrap convergence](bootstrap_convergence.png)", "",
            "### 1.3 Advantage values, N = 32 (analytical; k = 1 is Pass@1 with the population std)", "",
            "A_pos / A_neg:", ""]
    table = a["advantage_table"]
    nps = sorted({r["n_pos"] for r in table})
    out += ["| k | " + " | ".join(f"N_pos = {p}" for p in nps) + " |", "|---|" + "---|" * len(nps)]
    for k in sorted({r["k"] for r in table}):
        cells = []
        for p in nps:
            r = next(r for r in table if (r["k"], r["n_pos"]) == (k, p))
            cells.append("0 / 0" if r["a_pos"] == 0 and r["a_neg"] == 0 else f"{r['a_pos']:.3f} / {r['a_neg']:.3f}")
        out.append(f"| {k} | " + " | ".join(cells) + " |")
    checks = []
    for v in a["paper_values"]:
        r = next(r for r in table if (r["k"], r["n_pos"]) == (v["k"], v["n_pos"]))
        ok = round(r["a_pos"], 3) == v["paper_a_pos"] and round(r["a_neg"], 3) == v["paper_a_neg"]
        checks.append(f"k = {v['k']}, N_pos = {v['n_pos']}: {r['a_pos']:.3f} / {r['a_neg']:.3f} (paper "
                      f"{v['paper_a_pos']:.3f} / {v['paper_a_neg']:.3f}, {'reproduced' if ok else '**differs**'})")
    out += ["", "The paper's examples: " + "; ".join(checks) + ". With k ≥ 2 the advantage is exactly 0 once "
            "N_neg < k (every k-subset passes): easy prompts stop contributing.", ""]
    return out


# ------------------------------------------------------------------------------------------------ study
CLAIMS = (
    # (claim text, method a, method b, metric, paper evidence) — the claim is "a > b on metric".
    ("Pass@k training reaches a higher pass@k than Pass@1 training", "passk_analytic", "pass1", "passk",
     "Table 7: 65.0 vs 14.4"),
    ("Pass@k training does not cost pass@1 (here: improves it) versus Pass@1 training", "passk_analytic",
     "pass1", "pass1", "Table 7: 47.7 vs 13.9"),
    ("analytical > bootstrap (pass@k)", "passk_analytic", "passk_bootstrap", "passk", "Table 7: 65.0 vs 26.7"),
    ("bootstrap > full sampling (pass@k)", "passk_bootstrap", "passk_full", "passk", "Table 7: 26.7 vs 24.7"),
    ("Pass@1 training collapses the policy entropy, Pass@k training keeps it", "passk_analytic", "pass1",
     "entropy", "Figures (no numbers)"),
    ("Pass@k training keeps more diverse answers (distinct wrong answers per prompt)", "passk_analytic",
     "pass1", "diversity", "Section 3 (diversity analysis)"),
    ("Pass@k → Pass@1 transfers to a better pass@1 than Pass@1 training alone", "passk_then_pass1", "pass1",
     "pass1", "Table 2 (Enigmata): 30.8 vs 12.9"),
    ("combination (Eq. 18) improves pass@1 over plain Pass@k", "passk_combination", "passk_analytic", "pass1",
     "Section 5"),
    ("entropy-adaptive improves pass@1 over plain Pass@k", "passk_adaptive", "passk_analytic", "pass1",
     "Section 5"),
)


def _metric_key(study: dict[str, Any], metric: str) -> str:
    return {"pass1": "eval/pass@1", "passk": f"eval/pass@{study['ks'][-1]}", "entropy": "entropy_final",
            "diversity": "eval/distinct_wrong_per_prompt"}[metric]


def judge(a: tuple[float, float], b: tuple[float, float], seeds: int, scale: float = 1.0) -> tuple[float, str]:
    """(difference a - b, verdict): 'reproduced' when a - b > 2 SE of the difference, 'contradicted' when
    a - b < -2 SE, 'inconclusive' otherwise; with one seed only the direction is reported. ``scale`` only
    changes the unit the verdict prints (100 for percentages), never the verdict."""
    diff = a[0] - b[0]
    if seeds < 2:
        direction = "same direction" if diff > 0 else "opposite direction" if diff < 0 else "no difference"
        return diff, f"single seed: no verdict ({direction})"
    se = math.sqrt(a[1] ** 2 + b[1] ** 2)
    if diff > 2 * se:
        return diff, "reproduced"
    if diff < -2 * se:
        return diff, "contradicted"
    return diff, f"inconclusive (|difference| ≤ 2 SE = {2 * se * scale:.2f})"


def study_section(s: dict[str, Any]) -> list[str]:
    spec, ks, sources = s["spec"], s["ks"], s["sources"]
    rows = {r["method"]: r for r in s["rows"]}
    k_train = spec["k"]
    kmax = ks[-1]
    quick = spec["name"] == "quick"
    seeds = min(r["seeds"] for r in s["rows"] if r["method"] != "warm_start")
    out = ["## 2. Training study", ""]
    if quick:
        out += ["> **Quick mode** (`--quick`): a smoke test of the pipeline with tiny sizes, a couple of RL "
                "steps and one seed. The numbers below carry no information about the claims.", ""]
    else:
        from experiments.reproduce.study import FULL, METHODS
        requested = spec.get("methods", [m.key for m in METHODS])
        missing = [m.label for m in METHODS if m.key in requested and m.key not in rows]
        left_out = [m.label for m in METHODS if m.key not in requested]
        if left_out:
            out += [f"> **Subset study** (`--methods`): {', '.join(left_out)} not included.", ""]
        steps = spec["overrides"].get("train.steps")
        if steps != FULL.overrides["train.steps"]:
            out += [f"> **Budget changed** (`--steps`): {steps} RL steps per run (default study: "
                    f"{FULL.overrides['train.steps']}).", ""]
        if missing or seeds < FULL.seeds:
            out += [f"> **Partial study:** {seeds} of {FULL.seeds} seeds"
                    + (f"; not yet run: {', '.join(missing)}" if missing else "")
                    + ". With one seed every verdict below is inconclusive by construction (no standard error); "
                    "rerun `python -m experiments.reproduce --study` to complete it (finished runs are "
                    "skipped).", ""]
    o = spec["overrides"]
    out += ["**Setup.** Tiny character-level transformer (`ModelConfig.tiny`, ~1M parameters) on mazes; "
            f"train sizes {', '.join(f'{t}×{t}' for t in spec['train_sizes'])}, held-out test sizes "
            f"{', '.join(f'{t}×{t}' for t in spec['test_sizes'])} ({spec['test_per_size']} mazes each, fixed "
            f"for every run; sizes beyond the training ones test generalisation, as the paper's 17×17-21×21); "
            f"{spec['num_train']} training mazes. One SFT warm start "
            f"({o.get('sft.steps')} steps) shared by every run; then {o.get('train.steps')} RL steps of "
            f"{o.get('rollout.prompts_per_step')} prompts × N = {o.get('rollout.num_samples')} rollouts, "
            f"k = {k_train}, the paper's clip-higher token-mean loss. Evaluation: {o.get('eval.num_samples')} "
            f"samples per maze at temperature 1.0, top-p 0.95, unbiased pass@k. {seeds} seed(s) per method; "
            "the seed changes the RL sampling, the data order and the evaluation samples, not the warm start "
            "nor the data. Mean ± standard error over seeds; percentages.", ""]
    w = rows["warm_start"]["stats"]
    per_size = ", ".join(f"{src.replace('maze_', '')} {w[f'eval/{src}/pass@1'][0]:.0%} / "
                         f"{w[f'eval/{src}/pass@{kmax}'][0]:.0%}" for src in sources)
    some = all(0 < w[f"eval/{src}/pass@1"][0] and w[f"eval/{src}/pass@{kmax}"][0] < 1 for src in sources)
    out += [f"**Difficulty check** (the warm start should solve some but not all test mazes): warm-start "
            f"pass@1 / pass@{kmax} per size: {per_size} — "
            + ("satisfied for every size." if some else "**not satisfied for every size** (a size with "
               f"pass@1 = 0 gives every estimator a zero advantage; pass@{kmax} = 1 leaves nothing to "
               "explore)."), ""]
    ws = s["warm_start"]
    out += [f"**Shared warm start:** {'verified' if ws['ok'] else '**NOT verified**'} — SFT trained in "
            f"{len(ws['sft_trained_in'])} run(s), reused from the cache by all others; initial evaluations "
            f"identical across methods within each seed: {ws['initial_eval_identical_within_seed']}.", ""]
    # Table 7 shape
    has_greedy = "eval/greedy_accuracy" in rows["warm_start"]["stats"]
    head = ["training", "Pass@1", f"Pass@{k_train}", f"Pass@{kmax}"] + (["greedy"] if has_greedy else [])
    head += ["distinct wrong / prompt", "entropy (end)", "paper Table 7 (Pass@1 / Pass@k)"]
    out += ["### 2.1 Held-out results, all test sizes (the shape of the paper's Table 7)", "",
            "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in s["rows"]:
        st = r["stats"]
        paper = PAPER_TABLE7.get(r["method"])
        cells = [r["label"], _pm(st["eval/pass@1"]), _pm(st.get(f"eval/pass@{k_train}", (float("nan"),) * 2)),
                 _pm(st[f"eval/pass@{kmax}"])]
        if has_greedy:
            cells.append(_pm(st["eval/greedy_accuracy"]))
        cells += [_pm(st["eval/distinct_wrong_per_prompt"], 1.0, 2), _pm(st["entropy_final"], 1.0, 3),
                  f"{paper[0]} / {paper[1]}" if paper else "–"]
        out.append("| " + " | ".join(cells) + " |")
    out += ["", "Entropy (end) is the mean token entropy of the rollouts over the last 3 RL steps (warm start "
            "row: the first RL step). The paper's numbers are a 7B model on 7×7–21×21 mazes; compare directions, "
            "not values.", "",
            f"### 2.2 Per maze size: Pass@1 / Pass@{kmax}", "",
            "| training | " + " | ".join(src.replace("maze_", "") for src in sources) + " |",
            "|---|" + "---|" * len(sources)]
    for r in s["rows"]:
        st = r["stats"]
        cells = [f"{_pm(st[f'eval/{src}/pass@1'])} / {_pm(st[f'eval/{src}/pass@{kmax}'])}" for src in sources]
        out.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    out += ["", "![pass@k](study_pass_at_k.png)", "", "![curves](study_curves.png)", "",
            "### 2.3 Which claims reproduced", "",
            "Verdict rule: the paper's direction holds by more than 2 standard errors of the difference "
            f"(over {seeds} seed(s)) → reproduced; the opposite by more than 2 SE → contradicted; otherwise "
            "inconclusive.", "", "| claim | paper | measured (a − b) | verdict |", "|---|---|---|---|"]
    claims = judged_claims(s, rows, seeds)
    for text, paper, sa, sb, scale, diff, verdict in claims:
        out.append(f"| {text} | {paper} | {_pm(sa, scale, 2)} vs {_pm(sb, scale, 2)} "
                   f"(Δ = {diff * scale:+.2f}) | {verdict} |")
    out += [""] + findings(s, rows, claims)
    return out


def judged_claims(s: dict[str, Any], rows: dict[str, Any], seeds: int) -> list[tuple]:
    """(text, paper, stat a, stat b, display scale, a - b, verdict) for each claim whose methods both ran."""
    out = []
    for text, a, b, metric, paper in CLAIMS:
        if a not in rows or b not in rows:
            continue
        key = _metric_key(s, metric)
        sa, sb = rows[a]["stats"][key], rows[b]["stats"][key]
        scale = 100.0 if key.startswith("eval/pass") else 1.0
        out.append((text, paper, sa, sb, scale, *judge(tuple(sa), tuple(sb), seeds, scale)))
    return out


def findings(s: dict[str, Any], rows: dict[str, Any], claims: list[tuple]) -> list[str]:
    """Section 2.4: what moved from the warm start, and how many claims point the paper's way."""
    kmax = s["ks"][-1]
    w = rows["warm_start"]["stats"]
    keys = ("eval/pass@1", f"eval/pass@{kmax}", "entropy_final")
    out = ["### 2.4 What the numbers say", "",
           f"Change from the warm start (points of pass@1 and pass@{kmax}; nats of token entropy), mean over "
           "seeds:", "", f"| training | Δ pass@1 | Δ pass@{kmax} | Δ entropy |", "|---|---|---|---|"]
    for r in s["rows"]:
        if r["method"] == "warm_start":
            continue
        st = r["stats"]
        d = [st[k][0] - w[k][0] for k in keys]
        out.append(f"| {r['label']} | {d[0] * 100:+.1f} | {d[1] * 100:+.1f} | {d[2]:+.3f} |")
    total, same = len(claims), sum(diff > 0 for *_, diff, _ in claims)
    verdicts: dict[str, int] = {}
    for *_, verdict in claims:
        word = verdict.split(" ")[0]
        verdicts[word] = verdicts.get(word, 0) + 1
    summary = ", ".join(f"{n} {v}" for v, n in sorted(verdicts.items()))
    out += ["", f"Of {total} claims, {same} have point estimates in the paper's direction ({summary}). Read the "
            "size of each Δ against the standard errors above and the entropy column: a policy whose entropy "
            "has barely moved has not yet reached the regime (Pass@1 converging to a narrow, confident policy) "
            "where the paper's differences open up.", ""]
    return out


NOTES = """## 3. Discussion and caveats

* **Exact claims.** The Section 4 analysis, the paper's advantage examples and the bootstrap → analytical
  limit reproduce to the printed digits, with one correction: the Pass@8 peak of η is at 12.5% accuracy
  (the text's 25% is the Pass@4 peak). The paper's bootstrap *sum* is ≈ k × the analytical advantage at
  G = N (a scale Adam mostly absorbs); what remains is sampling noise — at G = N the bootstrap advantage is
  off by an RMS of the order of the advantages themselves, which is the paper's case for the analytical form.
* **Scale.** The training study is a CPU-sized proxy: a ~1M-parameter character model, tens of RL steps,
  small mazes, N = 16 rollouts. The paper's effects come from hundreds of steps on a 7B model, where
  Pass@1 training has time to collapse the entropy and to overfit the solvable mazes. Short runs mostly
  measure the first steps of each estimator; an "inconclusive" verdict at this scale is not evidence
  against the paper, and a "reproduced" one is weaker evidence than the paper's.
* **Diversity.** Distinct wrong answers per prompt is confounded with the error rate (a policy that
  fails more often has more chances to fail differently); read it together with pass@1.
* **What the seeds measure.** Every run shares the warm start and the data, so the standard errors cover
  RL sampling and evaluation sampling, not the warm start or the choice of test mazes.
"""


def write(out_dir: str) -> str:
    """Assemble RESULTS.md in ``out_dir`` from whatever analyses.json / study.json it holds."""
    a = _load(os.path.join(out_dir, "analyses.json"))
    s = _load(os.path.join(out_dir, "study.json"))
    lines = ["# Reproducing Pass@k Training (Chen et al., arXiv 2508.10751) at small scale", "",
             "Generated by `python -m experiments.reproduce` (`--analyses`: section 1, seconds; `--study`: "
             "section 2, CPU hours; `--all`: both). Regenerate rather than edit.", ""]
    if a:
        lines += analyses_section(a)
    if s:
        lines += study_section(s)
    else:
        lines += ["## 2. Training study", "",
                  "Not run yet in this output directory: `python -m experiments.reproduce --study` (7 methods × "
                  "3 seeds from one shared warm start; CPU hours, resumable) or `--study --quick` (smoke test).",
                  ""]
    if not a:
        lines += ["Exact analyses not run yet: `python -m experiments.reproduce --analyses`.", ""]
    lines += [NOTES]
    path = os.path.join(out_dir, "RESULTS.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path
