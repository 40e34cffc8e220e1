"""Exploratory results of a study: added after the main runs, not pre-registered, and changing no verdict.

* ``tests``: per claim, the two-sided p-value of the seed t-test (the test behind the seed interval), its
  Holm adjustment over all the claims, and the exact paired sign-flip p-value (``stats``);
* ``changes``: per maze size, each method's pass@k change from step 0 to the end of training (within the
  method) and its difference from Pass@1 at the end, seed mean with the 95% t-interval over seeds; a design
  with stages has the same tables at the end of its first stage (where its staged run is the first stage's
  method alone);
* ``wrong_share``: the paper's answer-diversity metric, the distinct share of a maze's wrong responses.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

from experiments.reproduce import stats
from experiments.reproduce.claims import Metric

BASELINE = "pass1"


def _num(x: float, percent: bool, signed: bool = False) -> str:
    if math.isnan(x):
        return "–"
    return f"{x * (100 if percent else 1):{'+' if signed else ''}.{1 if percent else 2}f}"


def _p(p: float, digits: int = 3) -> str:
    return "–" if math.isnan(p) else f"{p:.{digits}f}" if p >= 0.001 else "< 0.001"


def _change(values: Sequence[float], percent: bool, signed: bool = True) -> str:
    """"+mean [lo, hi]": the seed mean of ``values`` and its 95% t-interval."""
    ci = stats.t_interval(values)
    if math.isnan(ci.lo):
        return _num(ci.mean, percent, signed)
    return f"{_num(ci.mean, percent, signed)} [{_num(ci.lo, percent)}, {_num(ci.hi, percent)}]"


def tests(results: Sequence[dict[str, Any]]) -> list[str]:
    """The p-value table of the judged claims (``study_report.judged``)."""
    if not results or len(results[0]["diffs"]) < 2:
        return []
    nulls = [-j["claim"].margin if j["claim"].kind == "noninferiority" else 0.0 for j in results]
    p_t = [stats.t_test_p(j["diffs"], null) for j, null in zip(results, nulls)]
    holm = stats.holm(p_t)
    seeds = len(results[0]["diffs"])
    out = [f"**Multiplicity and an exact test.** Per claim: the two-sided p-value of the paired t-test over "
           f"the {seeds} seeds (below 0.05 exactly when the seed interval excludes the null: 0, or −margin "
           f"for non-inferiority), the same p-values Holm-adjusted over the {len(results)} claims, and the "
           f"exact two-sided sign-flip p-value over the 2^{seeds} sign vectors of the per-seed differences, "
           f"which cannot go below {2 / 2 ** seeds:.4g} (one-sided {1 / 2 ** seeds:.4g}) with {seeds} seeds "
           "whatever the data. The verdicts are the pre-registered ones.", "",
           "| claim | metric | Δ | t-test p | Holm p | sign-flip p | pre-registered verdict |",
           "|---|---|---|---|---|---|---|"]
    for j, null, p, h in zip(results, nulls, p_t, holm):
        m = j["metric"]
        out.append(f"| {j['claim'].key} | {m.label} | {_num(j['seed_ci'].mean, m.percent, True)} | {_p(p)} | "
                   f"{_p(h)} | {_p(stats.sign_flip_p(j['diffs'], null), 4) if seeds <= 16 else '–'} | "
                   f"{j['verdict']} |")
    return out + [""]


def changes(records, methods, sources, spec, step: int | None = None, label_at=None) -> list[str]:
    """Per size, the pass@k change from step 0 within each method and the difference from Pass@1, at
    ``step`` (default: the end of training); ``label_at(key, label, step, spec)`` names a method at ``step``."""
    at = (lambda r: r["steps"]) if step is None else (lambda r: step)
    when = spec.steps if step is None else step
    n = records[0]["num_samples"]
    names = list(dict.fromkeys(Metric(f"pass@{k}").resolve(n).name for k in (1, spec.k, 16, n)))
    sizes = [(0, "all")] + [(s, f"{s}×{s}") for s in spec.test_sizes]
    head = "| training | mazes | " + " | ".join(names) + " |"
    rule = "|---|---|" + "---|" * len(names)
    by = {(r["method"], r["seed"]): r for r in records}
    within = [f"**Change from step 0 to step {when}, within each method** (points of %, seed mean "
              "[95% t-interval over seeds]):", "", head, rule]
    versus = [f"**Difference from Pass@1 at step {when}** (points of %, paired by seed, seed mean "
              "[95% t-interval]):", "", head, rule]
    for key, label in methods:
        mine = [r for r in records if r["method"] == key]
        if not mine:
            continue
        if step is not None and label_at is not None:
            label = label_at(key, label, step, spec)
        for size, where in sizes:
            ms = [Metric(name, size) for name in names]
            within.append(f"| {label} | {where} | " + " | ".join(
                _change([m.value(r, at(r), sources) - m.value(r, 0, sources) for r in mine], True)
                for m in ms) + " |")
            pairs = [(r, by[(BASELINE, r["seed"])]) for r in mine if (BASELINE, r["seed"]) in by]
            if key != BASELINE and pairs:
                versus.append(f"| {label} | {where} | " + " | ".join(
                    _change([m.value(a, at(a), sources) - m.value(b, at(b), sources)
                             for a, b in pairs], True) for m in ms) + " |")
    out = within + [""]
    return out + versus + [""] if len(versus) > 4 else out


def wrong_share(records, methods, sources, spec) -> list[str]:
    """The paper's answer diversity (distinct wrong responses / wrong responses, per maze, mean over the
    mazes with at least one wrong response) at step 0 and at the end, and its difference from Pass@1."""
    m = Metric("wrong_share")
    by = {(r["method"], r["seed"]): r for r in records}
    out = ["**The paper's answer-diversity metric.** The paper measures diversity as the share of distinct "
           "answers among the wrong responses; the pre-registered diversity claim used distinct answers per "
           "maze instead. The records hold each maze's correct count and distinct wrong responses (whole "
           "response texts), so the share is computed per maze as distinct wrong / wrong responses and "
           "averaged over the mazes with at least one wrong response (%, seed mean [95% t-interval]):", "",
           f"| training | step 0 | step {spec.steps} | change from step 0 | difference from Pass@1 at step "
           f"{spec.steps} |", "|---|---|---|---|---|"]
    for key, label in methods:
        mine = [r for r in records if r["method"] == key]
        if not mine:
            continue
        start = [m.value(r, 0, sources) for r in mine]
        end = [m.value(r, r["steps"], sources) for r in mine]
        pairs = [(r, by[(BASELINE, r["seed"])]) for r in mine if (BASELINE, r["seed"]) in by]
        versus = "–" if key == BASELINE or not pairs else _change(
            [m.value(a, a["steps"], sources) - m.value(b, b["steps"], sources) for a, b in pairs], True)
        out.append(f"| {label} | {_change(start, True, False)} | {_change(end, True, False)} | "
                   f"{_change([e - s for s, e in zip(start, end)], True)} | {versus} |")
    return out + [""]


def section(records, results, methods, sources, spec, number: str, label_at=None) -> list[str]:
    """The exploratory subsection of a study (``records``: the complete seeds' records; ``label_at`` names
    a method at the end of the first stage of a design with stages)."""
    if not records:
        return []
    return ([f"### {number}.3 Exploratory results (not pre-registered)", "",
             "Computed from the same records after the main runs; none of them changes a verdict of "
             f"{number}.1.", ""]
            + (tests(results) if results and "p_t" not in results[0] else [])  # a Holm design has them in .1
            + ([] if not spec.stage_steps else changes(records, methods, sources, spec, spec.stage_steps[0], label_at))
            + changes(records, methods, sources, spec)
            + (wrong_share(records, methods, sources, spec)  # a primary metric of designs with stages
               if not spec.stage_steps else []))
