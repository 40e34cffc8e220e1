"""Section 2 of RESULTS.md: the training study of one design, from its committed records only."""
from __future__ import annotations

import math
import os
from typing import Any, Sequence

import numpy as np

from experiments.reproduce import claims as claims_lib
from experiments.reproduce import exploratory, figures, stats, study
from experiments.reproduce.claims import Metric

# The paper's Table 7 (maze, Qwen2.5-7B-Instruct, average over sizes 7-21): (Pass@1, Pass@k) in percent.
PAPER_TABLE7 = {"pass1": (13.9, 14.4), "passk_full": (12.7, 24.7), "passk_bootstrap": (16.8, 26.7),
                "passk_analytic": (47.7, 65.0)}


def _fmt(x: float, percent: bool, digits: int | None = None) -> str:
    if x is None or math.isnan(x):
        return "–"
    d = (1 if percent else 2) if digits is None else digits
    return f"{x * (100 if percent else 1):.{d}f}"


def _ci(ci: stats.Interval | None, percent: bool, digits: int | None = None) -> str:
    if ci is None:
        return "n/a"
    if math.isnan(ci.lo):
        return "– (one seed)"
    return f"[{_fmt(ci.lo, percent, digits)}, {_fmt(ci.hi, percent, digits)}]"


def _mean_ci(values: Sequence[float], percent: bool, digits: int | None = None) -> str:
    ci = stats.t_interval(values)
    if math.isnan(ci.lo):
        return _fmt(ci.mean, percent, digits)
    return f"{_fmt(ci.mean, percent, digits)} ± {_fmt(ci.hi - ci.mean, percent, digits)}"


def section(design: str, records_dir: str, out_dir: str, number: str = "2") -> list[str]:
    """The markdown of one design's study (writes its figures into ``out_dir``); [] without a manifest."""
    manifest = study.load_manifest(design, records_dir)
    if manifest is None:
        return []
    spec = study.StudySpec(**{**manifest["spec"], **{k: tuple(v) for k, v in manifest["spec"].items()
                                                     if isinstance(v, list)}})
    sources = manifest["sources"]
    records = study.load_records(spec, records_dir)
    title = {"main": "Training study (pre-registered design)", "pilot": "Pilot (Pass@1 only)",
             "pilot2": "Second design's pilot (Pass@1 only, N = 32, 5×5 training)",
             "second": "Second training study (pre-registered: does Pass@k training raise pass@k?)",
             "quick": "Training study, quick mode"}.get(spec.name.split("_")[0], f"Training study ({spec.name})")
    out = [f"## {number}. {title}", ""]
    if spec.name.startswith("quick"):
        out += ["> **Quick mode** (`--quick`): a smoke test of the pipeline with tiny sizes, a couple of RL "
                "steps and two seeds. The numbers carry no information about the claims.", ""]
    if not records:
        return out + ["No finished run yet: `python -m experiments.reproduce --study` runs them "
                      "(resumable; finished runs are skipped).", ""]
    methods = [(m, study.METHOD_BY_KEY[m].label) for m in spec.methods]
    done = {(r["method"], r["seed"]) for r in records}
    complete = [s for s in range(spec.seeds) if all((m, s) in done for m in spec.methods)]
    hours = sum(r["wall_s"] for r in records) / 3600
    superseded = study.load_superseded(spec, records_dir)
    redone = (f" plus {sum(r['wall_s'] for r in superseded) / 3600:.2f} hours in {len(superseded)} superseded "
              "run(s) (trained from a warm start that another machine rebuilt differently; kept under "
              "`superseded/`, not analysed)" if superseded else "")
    o = spec.overrides
    sizes = ", ".join(f"{t}×{t}" for t in spec.train_sizes)
    tests = ", ".join(f"{t}×{t}" for t in spec.test_sizes)
    out += [f"**Design** (`{spec.name}`, fingerprint `{spec.fingerprint()}`). Tiny character-level transformer "
            f"(~1M parameters) on mazes; train sizes {sizes}, held-out {tests} ({spec.test_per_size} mazes per "
            f"size, the same for every run). Per seed: an SFT warm start of {o['sft.steps']} steps (the seed's "
            f"own), then {spec.steps} RL steps of {o['rollout.prompts_per_step']} prompts × N = "
            f"{o['rollout.num_samples']} rollouts at learning rate {o['step.learning_rate']:g}, k = {spec.k}, "
            f"the paper's clip-higher token-mean loss. Evaluation at steps "
            f"{', '.join(str(i * spec.eval_every) for i in range(spec.eval_points))}: {o['eval.num_samples']} "
            "samples per maze at temperature 1.0, top-p 0.95 (unbiased pass@k), one greedy sample."
            + _methods_line(spec), "",
            f"**Progress.** {len(records)} of {spec.seeds * len(spec.methods)} runs; complete seeds: "
            f"{len(complete)} of {spec.seeds}; {hours:.2f} hours of wall time so far{redone} (machines: "
            f"{', '.join(sorted({r['machine'] for r in records}))}; commits "
            f"{', '.join(sorted({r['commit'] for r in records}))}).", ""]
    # Tables and figures are paired too: only complete seeds, unless none is complete yet.
    shown = [r for r in records if r["seed"] in complete] if complete else records
    if len(complete) < spec.seeds:
        pending = sorted({r["seed"] for r in records} - set(complete))
        out += [f"> **Partial study**: the tables, figures and verdicts below use the {len(complete)} complete "
                f"seed(s) and are provisional"
                + (f" (finished runs of seed(s) {', '.join(map(str, pending))} wait for their seed)"
                   if complete and pending else "")
                + "; `python -m experiments.reproduce --study` continues it.", ""]
    out += _warm_start(shown, spec, sources)
    out += _results_table(shown, methods, sources, spec)
    out += _per_size(shown, methods, sources, spec)
    tag = spec.name
    figures.learning_curves(shown, methods, sources, os.path.join(out_dir, f"study_{tag}_curves.png"))
    figures.pass_at_k_curves(shown, methods, sources, spec.test_sizes,
                             os.path.join(out_dir, f"study_{tag}_pass_at_k.png"))
    out += [f"![learning curves](study_{tag}_curves.png)", "", f"![pass@k](study_{tag}_pass_at_k.png)", ""]
    if spec.stage_steps:  # pass@k over training per method and size; the dotted line: the stage switch
        figures.pass_at_k_over_training(shown, methods, sources, spec.test_sizes,
                                        os.path.join(out_dir, f"study_{tag}_pass_at_k_training.png"),
                                        switch=spec.stage_steps[0])
        out += [f"Pass@k over training (mean over seeds, 95% t-band; the dotted line at step {spec.stage_steps[0]}: "
                "the Pass@k → Pass@1 run switches to Pass@1):", "",
                f"![pass@k over training](study_{tag}_pass_at_k_training.png)", ""]
    out += _claims(records, sources, spec, number)
    out += exploratory.section(shown, judged(records, sources, spec), methods, sources, spec, number,
                               label_at=_label_at)
    return out


def _warm_start(records, spec, sources) -> list[str]:
    by_seed: dict[int, set[str]] = {}
    for r in records:
        by_seed.setdefault(r["seed"], set()).add(r["warm_start"])
    ok = all(len(v) == 1 for v in by_seed.values())
    distinct = len({next(iter(v)) for v in by_seed.values()})
    warm = {r["seed"]: r for r in records}
    cells = []
    for size in spec.test_sizes:
        p1 = np.mean([Metric("pass@1", size).value(r, 0, sources) for r in warm.values()])
        pn = np.mean([Metric(f"pass@{r['num_samples']}", size).value(r, 0, sources) for r in warm.values()])
        cells.append(f"{size}×{size} {p1:.1%} / {pn:.1%}")
    n = records[0]["num_samples"]
    return [f"**Warm starts.** Within each seed every method started from the same warm start: "
            f"{'verified' if ok else '**NOT verified**'} (step-0 evaluations identical); {distinct} distinct "
            f"warm start(s) over {len(by_seed)} seed(s). Warm-start pass@1 / pass@{n} per size (mean over "
            f"seeds): {'; '.join(cells)}.", ""]


def _methods_line(spec) -> str:
    """For designs with a stage split or per-method k / learning rate: what each method trains."""
    if not spec.stage_steps and all(study.METHOD_BY_KEY[m].k is None and study.METHOD_BY_KEY[m].lr_scale == 1
                                    for m in spec.methods):
        return ""
    lr = spec.overrides["step.learning_rate"]
    parts = []
    for key in spec.methods:
        m = study.METHOD_BY_KEY[key]
        if study.staged(key) and spec.stage_steps:
            parts.append(f"{m.label}: Pass@k analytical (k = {m.k or spec.k}) for steps 1-{spec.stage_steps[0]}, "
                         f"then Pass@1 for {spec.stage_steps[1]} steps (its step {spec.stage_steps[0]} is the "
                         "Pass@k arm)")
        elif key == "pass1":
            parts.append(f"{m.label}: the GRPO advantage for {spec.steps} steps")
        else:
            parts.append(f"{m.label}: k = {m.k or spec.k}, learning rate {lr * m.lr_scale:g}, {spec.steps} steps")
    return " Methods: " + "; ".join(parts) + "."


def _rows(records, methods, spec, warm_label: str = "warm start (step 0)"
          ) -> list[tuple[str, list[dict[str, Any]], int | None]]:
    """(label, records, step) rows of the result tables: the warm start, then every method at the end of
    training (step None), or for a staged design every method at the end of the first stage and at the end."""
    warm = list({r["seed"]: r for r in records}.values())
    rows: list[tuple[str, list[dict[str, Any]], int | None]] = [(warm_label, warm, 0)]
    steps: list[int | None] = [spec.stage_steps[0], spec.steps] if spec.stage_steps else [None]
    for step in steps:
        for key, label in methods:
            mine = [r for r in records if r["method"] == key]
            shown = label if step is None else f"{_label_at(key, label, step, spec)} (step {step})"
            rows.append((shown, mine, step))
    return rows


def _label_at(key: str, label: str, step: int, spec) -> str:
    """A staged method's label at the end of its first stage is its first stage's method; any method at step
    0 is the seed's warm start."""
    if step == 0:
        return "warm start"
    if spec.stage_steps and step <= spec.stage_steps[0] and study.staged(key):
        return f"Pass@k, analytical, k = {spec.k}"
    return label


def _results_table(records, methods, sources, spec) -> list[str]:
    n = records[0]["num_samples"]
    cols = [Metric("pass@1"), Metric(f"pass@{spec.k}"), Metric("pass@16").resolve(n), Metric(f"pass@{n}"),
            Metric("greedy"), Metric("distinct"), Metric("distinct_wrong"), Metric("entropy")]
    cols = list(dict.fromkeys(cols))
    head = ["training"] + [c.label for c in cols] + ["paper Table 7 (Pass@1 / Pass@k)"]
    when = (f"at steps {spec.stage_steps[0]} and {spec.steps}" if spec.stage_steps else "at the end of training")
    out = [f"### Held-out results {when} (all sizes; mean ± 95% t-interval half-width over "
           "seeds; rates in %)", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, mine, at in _rows(records, methods, spec):
        if not mine:
            continue
        cells = [_mean_ci([c.value(r, r["steps"] if at is None else at, sources) for r in mine], c.percent)
                 for c in cols]
        key = next((k for k, lab in methods if lab == label), None)
        paper = PAPER_TABLE7.get(key) if not spec.stage_steps else None
        out.append(f"| {label} ({len(mine)}) | " + " | ".join(cells) + f" | {f'{paper[0]} / {paper[1]}' if paper else '–'} |")
    out += ["", "(n) = seeds. Entropy: mean token entropy of the policy on its training rollouts over the last "
            f"{claims_lib.ENTROPY_WINDOW} RL steps (warm start: the first step). Distinct answers count "
            "identical responses once. The paper's numbers are a 7B model on 7×7–21×21 mazes: compare "
            "directions, not values.", ""]
    return out


def _per_size(records, methods, sources, spec) -> list[str]:
    n = records[0]["num_samples"]
    k = Metric("pass@16").resolve(n).name
    out = [f"### Per maze size: pass@1 / {k} (%, mean over seeds)", "",
           "| training | " + " | ".join(f"{s}×{s}" for s in spec.test_sizes) + " |",
           "|---|" + "---|" * len(spec.test_sizes)]
    for label, mine, at in _rows(records, methods, spec, warm_label=("warm start (step 0)" if spec.stage_steps else "warm start")):
        if not mine:
            continue
        cells = []
        for size in spec.test_sizes:
            v1 = np.mean([Metric("pass@1", size).value(r, r["steps"] if at is None else at, sources) for r in mine])
            vk = np.mean([Metric(k, size).value(r, r["steps"] if at is None else at, sources) for r in mine])
            cells.append(f"{v1 * 100:.1f} / {vk * 100:.1f}")
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    return out + [""]


def judged(records, sources, spec, *, complete_only: bool = True) -> list[dict[str, Any]]:
    """Every claim whose two methods are in the design, judged on the complete seeds."""
    if complete_only:
        done = {(r["method"], r["seed"]) for r in records}
        seeds = {s for s in range(spec.seeds) if all((m, s) in done for m in spec.methods)}
        records = [r for r in records if r["seed"] in seeds]
    claims, rule = claims_lib.for_design(spec.name)
    stage_end = spec.stage_steps[0] if spec.stage_steps else None
    out = []
    for claim in claims:
        if claim.a in spec.methods and claim.b in spec.methods:
            j = claims_lib.judge(claim, records, sources, stage_end=stage_end)
            if j is not None:
                out.append(j)
    return claims_lib.judge_holm(out) if rule == "holm" and out else out


def _claims(records, sources, spec, number: str) -> list[str]:
    results = judged(records, sources, spec)
    if not results:
        return []
    if claims_lib.for_design(spec.name)[1] == "holm":
        return _claims_holm(results, spec, number) + _over_time(records, sources, spec, number)
    out = [f"### {number}.1 The paper's claims", "",
           "Per claim: the per-seed paired difference a − b at the end of training, its mean, the 95% "
           "t-interval over seeds and the 95% maze-bootstrap interval; the verdict follows the rule "
           "pre-registered in `experiments/reproduce/DESIGN.md` (superiority: both intervals above 0 → "
           "reproduced, both below → contradicted; non-inferiority: both lower bounds above −margin → "
           "reproduced, both upper bounds below 0 → contradicted; otherwise inconclusive).", "",
           "| claim | paper | metric | a | b | Δ = a − b | seed 95% CI | maze 95% CI | per-seed Δ | verdict |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for j in results:
        c, m = j["claim"], j["metric"]
        pct = m.percent
        per_seed = ", ".join(_fmt(d, pct) for d in j["diffs"])
        label = m.label + (f", margin {_fmt(c.margin, pct)}" if c.kind == "noninferiority" else "")
        out.append(f"| {c.text} | {c.paper} | {label} | {_fmt(np.mean(j['a']), pct)} | {_fmt(np.mean(j['b']), pct)} | "
                   f"{_fmt(j['seed_ci'].mean, pct)} | {_ci(j['seed_ci'], pct)} | {_ci(j['maze_ci'], pct)} | "
                   f"{per_seed} | **{j['verdict']}** |")
    counts: dict[str, int] = {}
    for j in results:
        counts[j["verdict"]] = counts.get(j["verdict"], 0) + 1
    out += ["", f"Verdicts over {len(results)} claims on {len(results[0]['seeds'])} seed(s): "
            + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) + ". Each claim is tested at 95% "
            "on its own (no multiplicity correction; Holm-adjusted and exact sign-flip p-values are among the "
            "exploratory results below); the rates are in points of %.", ""]
    out += _to_decide(results, spec)
    out += _over_time(records, sources, spec, number)
    return out


def _p(p: float) -> str:
    return "–" if math.isnan(p) else f"{p:.3f}" if p >= 0.001 else "< 0.001"


def _claims_holm(results, spec, number: str) -> list[str]:
    """The claims table under the second design's rule (Holm-adjusted t-test and sign-flip p-values, the
    maze interval; DESIGN.md, "Second design")."""
    seeds = len(results[0]["seeds"])
    primary = [j for j in results if j["claim"].primary]
    out = [f"### {number}.1 The paper's claims (pre-registered rule)", "",
           f"Per claim: the paired per-seed difference a − b over {seeds} complete seed(s) (each side at its "
           "step), its mean and 95% t-interval over seeds, the 95% maze-bootstrap interval, and the two-sided "
           "p-values of the t-test and of the exact sign-flip test of mean = boundary (0; −margin for "
           f"non-inferiority), each Holm-adjusted over the {len(primary)} primary claims (secondary claims: "
           "unadjusted). Reproduced: the mean beyond the boundary in the claim's direction, both adjusted "
           "p < 0.05 and the maze interval beyond the boundary; contradicted: the same on the other side; "
           f"otherwise inconclusive. With {seeds} seeds the sign-flip p-value cannot go below "
           f"{2 / 2 ** seeds:.4g}. The distinct share of wrong responses is bootstrapped over the mazes with a "
           "wrong response on both sides in every seed.", "",
           "| claim | paper | metric | a (step) | b (step) | Δ = a − b | seed 95% CI | maze 95% CI | t-test p (Holm) "
           "| sign-flip p (Holm) | per-seed Δ | verdict |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    labels = dict((m, study.METHOD_BY_KEY[m].label) for m in spec.methods)
    for j in results:
        c, m = j["claim"], j["metric"]
        pct = m.percent
        per_seed = ", ".join(_fmt(d, pct) for d in j["diffs"])
        label = m.label + (f", margin {_fmt(c.margin, pct)}" if c.kind == "noninferiority" else "")
        a = f"{_label_at(c.a, labels[c.a], j['step_a'], spec)} ({j['step_a']}): {_fmt(np.mean(j['a']), pct)}"
        b = f"{_label_at(c.b, labels[c.b], j['step_b'], spec)} ({j['step_b']}): {_fmt(np.mean(j['b']), pct)}"
        tag = "" if c.primary else " (secondary)"
        out.append(f"| {c.key}{tag}: {c.text} | {c.paper} | {label} | {a} | {b} | {_fmt(j['seed_ci'].mean, pct)} | "
                   f"{_ci(j['seed_ci'], pct)} | {_ci(j['maze_ci'], pct)} | {_p(j['p_t'])} ({_p(j['p_t_holm'])}) | "
                   f"{_p(j['p_sf'])} ({_p(j['p_sf_holm'])}) | {per_seed} | **{j['verdict']}** |")
    if any(j["claim"].metric.name == "wrong_share" for j in results):
        out += ["", "Reading the diversity claim: per maze, distinct wrong / wrong responses rises by itself when "
                "a maze has fewer wrong responses (fewer draws, fewer repeats), so an arm with a higher pass@1 "
                "scores higher on it partly by construction; the per-size tables show how the arms' pass@1 "
                "compare."]
    final = "" if seeds >= spec.seeds else f" **Provisional**: {seeds} of {spec.seeds} seeds."
    for group, name in ((primary, "primary"), ([j for j in results if not j["claim"].primary], "secondary")):
        counts: dict[str, int] = {}
        for j in group:
            counts[j["verdict"]] = counts.get(j["verdict"], 0) + 1
        if group:
            out += ["", f"Verdicts over the {len(group)} {name} claims: "
                    + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) + "." + final]
    return out + [""]


def _to_decide(results, spec) -> list[str]:
    """For every inconclusive claim: how many seeds and held-out mazes would let each interval decide if the
    observed mean difference and spread held (``stats.seeds_to_decide`` / ``mazes_to_decide``)."""
    open_ = [j for j in results if j["verdict"] == "inconclusive" and len(j["diffs"]) >= 2]
    if not open_:
        return []
    out = ["What would decide the inconclusive claims, if the observed mean difference and its spread held "
           "(planning numbers, not tests: at exactly these counts an interval decides about half the time; "
           "80% power needs roughly twice as many). A verdict needs both intervals.", "",
           "| claim | Δ (sd over seeds) | seed interval now | seeds needed | maze interval now | held-out mazes per size needed |",
           "|---|---|---|---|---|---|"]
    for j in open_:
        c, m = j["claim"], j["metric"]
        pct = m.percent
        sd = float(np.std(j["diffs"], ddof=1))
        n, v = stats.seeds_to_decide(j["diffs"], kind=c.kind, margin=c.margin)
        seed_now = stats.verdict(j["seed_ci"], None, kind=c.kind, margin=c.margin)
        seeds = "–" if seed_now != "inconclusive" else (f"{n} (→ {v})" if n else "none (mean ≈ 0)")
        if j["maze_ci"] is None:
            maze_now, mazes = "n/a", "n/a"
        else:
            maze_now = stats.verdict(j["maze_ci"], None, kind=c.kind, margin=c.margin)
            sizes = 1 if m.size else len(spec.test_sizes)
            mz, mv = stats.mazes_to_decide(j["maze_ci"], sizes * spec.test_per_size, kind=c.kind,
                                           margin=c.margin)
            mazes = "–" if maze_now != "inconclusive" else (
                f"{math.ceil(mz / sizes)} (→ {mv})" if mz else "none (mean ≈ 0)")
        out.append(f"| {c.key}: {m.label} | {_fmt(j['seed_ci'].mean, pct)} ({_fmt(sd, pct)}) | {seed_now} | "
                   f"{seeds} | {maze_now} | {mazes} |")
    return out + [""]


def _over_time(records, sources, spec, number: str) -> list[str]:
    """The primary differences at every evaluation point (descriptive)."""
    steps = [i * spec.eval_every for i in range(1, spec.eval_points)]
    claims, rule = claims_lib.for_design(spec.name)
    keys = ("explore", "no_cost", "entropy", "diversity", "transfer") + (
        ("rise_k16", "generalise", "explore_k8") if rule == "holm" else ())
    keep = [c for c in claims if c.key in keys and c.a in spec.methods and c.b in spec.methods]
    if not keep:
        return []
    out = [f"### {number}.2 The differences during training (mean Δ over complete seeds, seed 95% CI)", "",
           "| claim | " + " | ".join(f"step {s}" for s in steps) + " |", "|---|" + "---|" * len(steps)]
    done = {(r["method"], r["seed"]) for r in records}
    seeds = {s for s in range(spec.seeds) if all((m, s) in done for m in spec.methods)}
    recs = [r for r in records if r["seed"] in seeds]
    stage_end = spec.stage_steps[0] if spec.stage_steps else None
    for c in keep:
        cells = []
        for s in steps:
            if c.at_a == "stage1" and s > stage_end and (study.staged(c.a) or study.staged(c.b)):
                cells.append("–")  # past the stage the claim is about
                continue
            j = claims_lib.judge(c, recs, sources, step=s, stage_end=stage_end, draws=200)
            if j is None:
                cells.append("–")
                continue
            pct = j["metric"].percent
            cells.append(f"{_fmt(j['seed_ci'].mean, pct)} {_ci(j['seed_ci'], pct)}")
        label = c.metric.resolve(recs[0]["num_samples"], sources).label if recs else c.metric.label
        out.append(f"| {c.key}: {label} | " + " | ".join(cells) + " |")
    return out + [""]


def claims_csv(records, sources, spec, path: str) -> None:
    """The claims table as CSV (numbers in the metric's unit: fractions for rates)."""
    with open(path, "w") as f:
        f.write("claim,a,b,metric,kind,margin,seeds,mean_a,mean_b,diff,seed_lo,seed_hi,maze_lo,maze_hi,verdict\n")
        for j in judged(records, sources, spec):
            c, m, mz = j["claim"], j["metric"], j["maze_ci"]
            where = "@" + "+".join(map(str, m.sizes)) if m.sizes else ""
            f.write(f"{c.key},{c.a},{c.b},{m.name}{where},{c.kind},{c.margin},"
                    f"{len(j['seeds'])},{np.mean(j['a']):.6g},{np.mean(j['b']):.6g},{j['seed_ci'].mean:.6g},"
                    f"{j['seed_ci'].lo:.6g},{j['seed_ci'].hi:.6g},{mz.lo if mz else float('nan'):.6g},"
                    f"{mz.hi if mz else float('nan'):.6g},{j['verdict']}\n")

