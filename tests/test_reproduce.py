"""experiments.reproduce: the exact analyses (eta argmax, bootstrap convergence, advantage values), the
study's statistics on numbers with known answers, and its quick mode end to end (records -> RESULTS.md)."""
import dataclasses
import json
import os

import numpy as np
import pytest

from experiments.reproduce import analyses, claims, report, stats, study


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    """analyses.run once (reduced bootstrap sweep): its output directory and summary."""
    out = str(tmp_path_factory.mktemp("reproduce") / "out")
    return out, analyses.run(out, seeds=2, groups=(16, 1024), verbose=False)


@pytest.fixture(scope="module")
def curves():
    return analyses.eta_curves()


def test_eta_argmax(curves, analysed):
    argmax = analyses.eta_argmax(curves)
    assert {label: r["n_pos"] for label, r in analysed[1]["eta_argmax"].items()} == argmax
    n = analyses.N
    assert argmax["Pass@1"] == n // 2  # 50%
    assert argmax["Pass@4"] == n // 4  # 25%
    assert argmax["Pass@8"] == n // 8  # 12.5%
    assert argmax["Pass@16"] == n // 16  # 6.25%
    assert argmax["exceed (k=4)"] == 1
    for label, p in analyses.PAPER_ARGMAX.items():
        assert argmax[label] == p, label
    # Pass@k gives easy prompts nothing: eta = 0 once N_neg < k.
    assert np.all(curves["Pass@8"][n - 7:] == 0) and curves["Pass@8"][n - 8] > 0
    # the Pass@1 curve is the GRPO closed form 2 sqrt(N_pos N_neg)
    p = np.arange(n + 1)
    np.testing.assert_allclose(curves["Pass@1"], 2 * np.sqrt(p * (n - p)), rtol=1e-5)


def test_advantage_values():
    table = {(r["k"], r["n_pos"]): r for r in analyses.advantage_table()}
    for (k, n_pos), (a_pos, a_neg) in analyses.PAPER_VALUES.items():
        assert round(table[k, n_pos]["a_pos"], 3) == a_pos
        assert round(table[k, n_pos]["a_neg"], 3) == a_neg
    assert table[8, 1]["a_pos"] == pytest.approx(np.sqrt(3), rel=1e-5)  # Rbar = 1/4 exactly
    for r in table.values():  # advantages sum to zero per prompt
        assert r["n_pos"] * r["a_pos"] + (analyses.N - r["n_pos"]) * r["a_neg"] == pytest.approx(0, abs=1e-5)
    assert table[16, 24]["a_pos"] == 0 and table[16, 24]["a_neg"] == 0  # N_neg = 8 < k


def test_bootstrap_converges_to_analytical(analysed):
    result = analysed[1]
    summary = {(r["k"], r["reduce"], r["num_groups"]): r["rms_error_mean"] for r in result["bootstrap"]}
    for k in analyses.BOOTSTRAP_KS:
        for reduce in ("mean", "sum"):
            small, large = summary[k, reduce, 16], summary[k, reduce, 1024]
            assert large < 0.35 * small, (k, reduce, small, large)  # ~1/sqrt(64) = 1/8 expected
            assert large < 0.1
    assert 3.0 < result["bootstrap_sum_slope_k4"] < 5.0  # the paper's sum is ~k x analytical


def test_run_config_rescales_stages(tmp_path):
    spec = study.make_spec("quick", steps=6)
    assert spec.name == "quick_steps6"
    c = study.run_config(spec, study.METHOD_BY_KEY["passk_then_pass1"], 3, train_file="a.jsonl",
                         test_file="b.jsonl", num_test=7, cache_dir=str(tmp_path))
    assert [s["steps"] for s in c.train.stages] == [3, 3]  # 20 + 20 of 40
    assert c.train.stages[0]["step"]["k"] == spec.k and c.train.stages[1]["step"]["k"] == 1
    pass1 = study.run_config(spec, study.METHOD_BY_KEY["pass1"], 0, train_file="a", test_file="b", num_test=1,
                             cache_dir=str(tmp_path))
    assert pass1.step.k == 1 and pass1.step.estimator == "grpo"
    assert c.seed == 3 and c.task.options.train_files == "a.jsonl" and c.eval.num_prompts == 7
    assert c.sft.seed == -1  # each seed its own warm start
    main = study.make_spec()
    assert main.eval_every * (main.eval_points - 1) == main.steps and main.seeds >= 5
    assert main.test_per_size >= 256 and main.overrides["eval.num_samples"] == 32
    assert study.make_spec(seeds=9).fingerprint() == main.fingerprint()  # seeds / methods: same runs
    assert study.make_spec(learning_rate=1e-3).fingerprint() != main.fingerprint()
    with pytest.raises(ValueError, match="unknown method"):
        study.make_spec(methods=["nope"])
    with pytest.raises(ValueError, match="divisible"):
        study.make_spec(steps=121)


def test_second_design_configs(tmp_path):
    """The second design: an exact 200 + 100 stage split, the k = 8 arm at twice the learning rate, N = 32;
    the main design's fingerprint (its committed records) is unchanged by the new fields."""
    import json
    import os

    spec = study.make_spec("second")
    made = {m: study.run_config(spec, study.METHOD_BY_KEY[m], 2, train_file="a", test_file="b", num_test=768,
                                cache_dir=str(tmp_path)) for m in spec.methods}
    staged = made["passk_then_pass1"]
    assert [s["steps"] for s in staged.train.stages] == [200, 100]
    assert staged.train.stages[0]["step"] == {"estimator": "passk_analytic", "k": 4}
    assert staged.train.stages[1]["step"]["estimator"] == "grpo"
    k8 = made["passk8_lr2"]
    assert (k8.step.k, k8.step.estimator, k8.train.stages) == (8, "passk_analytic", ())
    assert k8.step.learning_rate == pytest.approx(2 * made["pass1"].step.learning_rate)
    assert {c.rollout.num_samples for c in made.values()} == {32} and made["pass1"].step.k == 1
    assert spec.eval_every == 50 and 200 % spec.eval_every == 0  # Pass@k is compared at step 200
    assert study.make_spec("second", steps=30).stage_steps == (20, 10)
    with open(os.path.join(study.RECORDS, "main", "design.json")) as f:
        assert json.load(f)["fingerprint"] == study.MAIN.fingerprint()
    bad = study.dataclasses.replace(spec, stage_steps=(200, 50))
    with pytest.raises(ValueError, match="stage_steps"):
        study.run_config(bad, study.METHOD_BY_KEY["passk_then_pass1"], 0, train_file="a", test_file="b",
                         num_test=1, cache_dir=str(tmp_path))


def test_t_interval_known_values_and_coverage():
    ci = stats.t_interval([1.0, 2.0, 3.0])
    half = 4.302652729911275 / np.sqrt(3)  # t_{0.975, 2} * sd / sqrt(n), sd = 1
    assert (ci.mean, ci.lo, ci.hi) == pytest.approx((2.0, 2.0 - half, 2.0 + half))
    assert np.isnan(stats.t_interval([1.0]).lo)
    rng = np.random.default_rng(0)  # coverage of a true mean 0.3 with 5 normal seeds: 95% +- 1%
    hits = [stats.t_interval(rng.normal(0.3, 2.0, 5)).excludes(0.3) == 0 for _ in range(4000)]
    assert 0.94 < np.mean(hits) < 0.96


def test_exploratory_tests_against_scipy_and_by_hand():
    """The exploratory p-values: the t-test equals scipy's, the sign-flip p-value is exact enumeration (and
    scipy's permutation test), Holm by hand; five seeds cannot give a sign-flip p below 2/32 two-sided."""
    from scipy import stats as sp

    d = [0.3, -0.1, 0.5, 0.2, 0.4]
    assert stats.t_test_p(d) == pytest.approx(sp.ttest_1samp(d, 0.0).pvalue, rel=1e-12)
    assert stats.t_test_p(d, null=-0.01) == pytest.approx(sp.ttest_1samp(d, -0.01).pvalue, rel=1e-12)
    assert stats.sign_flip_p([1, 2, 3, 4, 5]) == 0.0625
    assert stats.sign_flip_p([1, 2, 3, 4, 5], alternative="greater") == 0.03125
    assert stats.sign_flip_p([1, -2, 3, 4, 5]) == 0.1875
    ref = sp.permutation_test((np.array([1.0, -2, 3, 4, 5]),), np.mean, permutation_type="samples",
                              n_resamples=np.inf).pvalue
    assert stats.sign_flip_p([1, -2, 3, 4, 5]) == pytest.approx(ref)
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert np.isnan(stats.holm([0.01, float("nan")])[1]) and stats.holm([0.01, float("nan")])[0] == 0.01
    assert np.isnan(stats.sign_flip_p([1.0, float("nan"), 2.0]))
    many = stats.sign_flip_p(np.ones(17))  # Monte Carlo beyond 16 seeds: (1 + hits) / (1 + 2^16)
    assert 1 / (1 + 2 ** 16) <= many < 1e-3
    with pytest.raises(ValueError, match="alternative"):
        stats.sign_flip_p([1.0, 2.0], alternative="less")


def test_wrong_share_is_the_distinct_share_of_wrong_responses():
    """The paper's diversity metric: distinct wrong responses / wrong responses; a maze with no wrong
    response has none (NaN) and is left out of the mean."""
    r = _record("pass1", 0, np.array([8, 6, 0]), 0.5)
    r["evals"]["4"]["distinct_wrong"] = [0, 1, 4]
    m = claims.Metric("wrong_share")
    values = m.per_maze(r, 4, ["maze_5x5"] * 3)
    assert np.isnan(values[0]) and values[1:].tolist() == [0.5, 0.5]
    assert m.value(r, 4, ["maze_5x5"] * 3) == 0.5


def test_maze_bootstrap_matches_normal_theory():
    rng = np.random.default_rng(1)
    a = rng.normal(0.1, 1.0, (1, 4000))
    ci = stats.maze_bootstrap(a, np.zeros_like(a), draws=4000)
    se = a.std() / np.sqrt(a.shape[1])
    assert ci.mean == pytest.approx(a.mean())
    assert ci.lo == pytest.approx(a.mean() - 1.96 * se, abs=0.15 * se)
    assert ci.hi == pytest.approx(a.mean() + 1.96 * se, abs=0.15 * se)
    same = stats.maze_bootstrap(np.full((3, 50), 0.7), np.full((3, 50), 0.2))
    assert (same.lo, same.hi) == pytest.approx((0.5, 0.5))  # a constant difference has no maze variance
    with pytest.raises(ValueError, match="seeds, mazes"):
        stats.maze_bootstrap(np.zeros(3), np.zeros(3))


@pytest.mark.parametrize("seed_ci, maze_ci, kind, expected", [
    ((0.2, 0.1, 0.3), (0.2, 0.05, 0.35), "superiority", "reproduced"),
    ((0.2, -0.1, 0.5), (0.2, 0.05, 0.35), "superiority", "inconclusive"),
    ((0.2, 0.1, 0.3), (0.2, -0.05, 0.45), "superiority", "inconclusive"),
    ((-0.2, -0.3, -0.1), (-0.2, -0.35, -0.05), "superiority", "contradicted"),
    ((-0.2, -0.3, -0.1), None, "superiority", "contradicted"),
    ((0.0, -0.005, 0.005), (0.0, -0.004, 0.004), "noninferiority", "reproduced"),
    ((-0.004, -0.008, -0.001), (-0.004, -0.007, -0.002), "noninferiority", "reproduced"),  # within margin
    ((-0.03, -0.05, -0.01), (-0.03, -0.04, -0.02), "noninferiority", "contradicted"),
    ((0.0, -0.02, 0.02), (0.0, -0.004, 0.004), "noninferiority", "inconclusive"),
    ((0.2, float("nan"), float("nan")), None, "superiority", "inconclusive"),
])
def test_verdict_rule(seed_ci, maze_ci, kind, expected):
    maze = None if maze_ci is None else stats.Interval(*maze_ci)
    assert stats.verdict(stats.Interval(*seed_ci), maze, kind=kind, margin=0.01) == expected


def test_pass_at_k_per_maze_is_exact():
    from math import comb

    counts = np.array([0, 1, 5, 31, 32])
    for k in (1, 4, 16, 32):
        brute = [1 - comb(32 - c, k) / comb(32, k) for c in counts]
        np.testing.assert_allclose(stats.pass_at_k_per_maze(counts, 32, k), brute, rtol=2e-6, atol=1e-7)
    with pytest.raises(ValueError, match="pass@8"):
        stats.pass_at_k_per_maze(counts, 4, 8)


def _record(method, seed, counts, entropy, steps=4, n=8):
    evals = {str(s): {"correct": list(map(int, counts if s else np.zeros_like(counts))),
                      "greedy": [0] * len(counts), "distinct": [n] * len(counts),
                      "distinct_wrong": [n] * len(counts)} for s in (0, steps)}
    return dict(method=method, seed=seed, steps=steps, num_samples=n, warm_start=f"w{seed}", evals=evals,
                curves={"entropy": [[t, entropy] for t in range(1, steps + 1)]})


def test_claims_on_synthetic_records_with_known_answer():
    """Five seeds, 40 mazes of two sizes: a beats b by exactly one correct sample out of 8 on every maze
    (pass@1 +12.5 points) and has entropy +0.1 - the claim is reproduced with exact per-seed differences;
    swapped, it is contradicted; a seed whose warm starts differ is refused."""
    rng = np.random.default_rng(0)
    sources = ["maze_5x5"] * 20 + ["maze_7x7"] * 20
    records = []
    for seed in range(5):
        base = rng.integers(0, 7, 40)
        records += [_record("passk_analytic", seed, base + 1, 0.6 + 0.01 * seed),
                    _record("pass1", seed, base, 0.5 + 0.01 * seed)]
    by_key = {c.key: c for c in claims.CLAIMS}
    j = claims.judge(by_key["no_cost"], records, sources)
    assert j["diffs"] == pytest.approx([0.125] * 5) and j["verdict"] == "reproduced"
    assert j["seed_ci"].lo == pytest.approx(0.125) and j["maze_ci"].lo == pytest.approx(0.125)
    ent = claims.judge(by_key["entropy"], records, sources)
    assert ent["diffs"] == pytest.approx([0.1] * 5) and ent["maze_ci"] is None and ent["verdict"] == "reproduced"
    big = claims.judge(by_key["generalise"], records, sources)
    assert big["metric"] == claims.Metric("pass@8", 7)  # k capped at the 8 samples, the largest size
    swapped = [dict(r, method={"pass1": "passk_analytic", "passk_analytic": "pass1"}[r["method"]]) for r in records]
    assert claims.judge(by_key["explore"], swapped, sources)["verdict"] == "contradicted"
    assert claims.judge(by_key["transfer"], records, sources) is None  # no Pass@k -> Pass@1 runs
    records[0]["warm_start"] = "other"
    with pytest.raises(ValueError, match="different warm starts"):
        claims.judge(by_key["explore"], records, sources)


def _second_records(seeds=10, mazes=12, noise=0.0):
    """Synthetic records of the second design: Pass@k -> Pass@1 solves 3 more of 32 samples per maze than
    its warm start at step 200 and 1 more than Pass@1 at 300; Pass@1 solves 1 more than the warm start;
    the k = 8 arm differs from Pass@1 by a seed-dependent sign (no effect)."""
    rng = np.random.default_rng(1)
    sources = [f"maze_{t}x{t}" for t in (5, 7, 9) for _ in range(mazes)]
    records = []
    for seed in range(seeds):
        base = rng.integers(0, 20, len(sources))
        k8 = np.clip(base + 1 + (1 if seed % 2 else -1) * (1 + rng.integers(0, 2, len(sources))), 0, 32)
        steps = range(50, 301, 50)
        per_step = {"pass1": {0: base, **{t: base + 1 for t in steps}},
                    "passk_then_pass1": {0: base, **{t: base + (3 if t <= 200 else 2) for t in steps}},
                    "passk8_lr2": {0: base, **{t: k8 for t in steps}}}
        for method, counts in per_step.items():
            evals = {str(t): {"correct": [int(x) for x in c], "greedy": [0] * len(c),
                              "distinct": [1] * len(c), "distinct_wrong": [32 - int(x) for x in c]}
                     for t, c in counts.items()}
            entropy = 0.5 + 0.01 * seed + (0.1 if method == "passk_then_pass1" else 0.0)
            records.append(dict(method=method, seed=seed, steps=300, num_samples=32, warm_start=f"w{seed}",
                                evals=evals, curves={"entropy": [[t, entropy] for t in range(1, 301)]}))
    return records, sources


def test_second_design_claims_under_the_holm_rule():
    """The second design's rule on synthetic records with a known answer: claims with an effect in every seed
    are reproduced (sign-flip p 2/1024, Holm-adjusted over the 7 primary claims), an effect of alternating
    sign is inconclusive, a step-200 claim reads step 200 and a within-method claim step 0; swapping the
    arms contradicts a superiority claim."""
    records, sources = _second_records()
    by_key = {c.key: c for c in claims.SECOND_CLAIMS}
    assert sum(c.primary for c in claims.SECOND_CLAIMS) == 7
    assert claims.for_design("second")[1] == "holm" and claims.for_design("main")[1] == "intervals"
    judged = claims.judge_holm([claims.judge(c, records, sources, stage_end=200) for c in claims.SECOND_CLAIMS])
    got = {j["claim"].key: j for j in judged}
    rise = got["rise_k16"]
    assert (rise["step_a"], rise["step_b"]) == (200, 0) and all(d > 0 for d in rise["diffs"])
    assert got["explore"]["step_a"] == got["explore"]["step_b"] == 200 and got["transfer"]["step_a"] == 300
    for key in ("rise_k8", "rise_k16", "explore", "no_cost", "generalise", "transfer", "entropy"):
        assert got[key]["verdict"] == "reproduced", (key, got[key]["p_t_holm"], got[key]["p_sf_holm"])
    assert got["explore"]["p_sf"] == pytest.approx(2 / 1024)
    primary_sf = sorted(j["p_sf"] for j in judged if j["claim"].primary)
    assert min(j["p_sf_holm"] for j in judged if j["claim"].primary) == pytest.approx(7 * primary_sf[0])
    assert got["entropy"]["p_sf_holm"] == got["entropy"]["p_sf"]  # secondary: unadjusted
    assert got["diversity"]["verdict"] == "inconclusive"  # every wrong response distinct on both sides
    assert got["diversity"]["diffs"] == pytest.approx([0.0] * 10) and got["diversity"]["p_t"] == 1.0
    assert got["explore_k8"]["verdict"] == "inconclusive"  # alternating sign over seeds
    assert got["no_cost_k8"]["verdict"] == "inconclusive"
    swapped = [dict(r, method={"pass1": "passk_then_pass1", "passk_then_pass1": "pass1"}.get(r["method"],
                                                                                             r["method"]))
               for r in records]
    contra = claims.judge_holm([claims.judge(by_key["explore"], swapped, sources, stage_end=200)])[0]
    assert contra["verdict"] == "contradicted"
    few = claims.judge_holm([claims.judge(c, records[:9], sources, stage_end=200) for c in claims.SECOND_CLAIMS
                             if c.primary])
    assert all(j["verdict"] == "inconclusive" for j in few)  # 3 seeds: sign-flip p >= 2/8 whatever the data
    with pytest.raises(ValueError, match="stage_steps"):
        claims.judge(by_key["explore"], records, sources)



def test_second_design_exploratory_tables_at_the_stage_cut():
    """A design with stages has the within-method and versus-Pass@1 tables at the end of its first stage too,
    where the staged run is named by its first stage's method and read at step 200 (exact on synthetic
    records: +3 of 32 samples per maze = +9.4 points, +2 of 32 over Pass@1 = +6.25; at step 300 +2 and +1)."""
    from experiments.reproduce import exploratory, study_report
    records, sources = _second_records(seeds=3)
    spec = study.make_spec("second")
    methods = [(m, study.METHOD_BY_KEY[m].label) for m in spec.methods]
    text = "\n".join(exploratory.section(records, None, methods, sources, spec, "4",
                                         label_at=study_report._label_at))
    cut, end = text.split("**Change from step 0 to step 300")
    assert "**Change from step 0 to step 200" in cut and "**Difference from Pass@1 at step 200" in cut
    row = next(line for line in cut.splitlines() if line.startswith("| Pass@k, analytical, k = 4 | all |"))
    assert row.split(" | ")[2] == "+9.4 [9.4, 9.4]"
    versus = cut.split("**Difference from Pass@1 at step 200")[1]
    row = next(line for line in versus.splitlines() if line.startswith("| Pass@k, analytical, k = 4 | all |"))
    assert float(row.split(" | ")[2].split()[0]) == pytest.approx(100 * 2 / 32, abs=0.06)  # 6.25: either rounding
    assert "Pass@k, analytical" not in end  # at step 300 the staged run is Pass@k -> Pass@1
    row = next(line for line in end.splitlines() if line.startswith("| Pass@k -> Pass@1 | all |"))
    assert float(row.split(" | ")[2].split()[0]) == pytest.approx(100 * 2 / 32, abs=0.06)

def _runs(counts_by_method, sources, seeds, n=32):
    """Records from {method: {step: int[seeds, mazes] correct counts}} (every wrong response distinct)."""
    out = []
    for method, by_step in counts_by_method.items():
        for seed in range(seeds):
            evals = {str(t): {"correct": [int(x) for x in c[seed]], "greedy": [0] * len(sources),
                              "distinct": [1] * len(sources), "distinct_wrong": [n - int(x) for x in c[seed]]}
                     for t, c in by_step.items()}
            out.append(dict(method=method, seed=seed, steps=300, num_samples=n, warm_start=f"w{seed}", evals=evals,
                            curves={"entropy": [[t, 0.5] for t in range(1, 301)]}))
    return out


def test_second_design_rule_edges():
    """Non-inferiority: a loss within the margin in every seed is reproduced, one beyond it contradicted; a
    maze interval that reaches the boundary blocks a verdict the seeds would give; the unseen-size claim
    reads only 7x7 and 9x9; a NaN p-value stays in the Holm family as 1."""
    sources = [f"maze_{t}x{t}" for t in (5, 7, 9) for _ in range(10)]
    seeds, rng = 10, np.random.default_rng(3)
    base = rng.integers(8, 20, (seeds, len(sources)))
    by_key = {c.key: c for c in claims.SECOND_CLAIMS}

    def judged(key, a_counts, b_counts):
        recs = _runs({"passk_then_pass1": {0: base, 200: a_counts, 300: a_counts},
                      "pass1": {0: base, 200: b_counts, 300: b_counts}}, sources, seeds)
        return claims.judge_holm([claims.judge(by_key[key], recs, sources, stage_end=200)])[0]

    # pass@1 of a maze = correct / 32: one fewer correct sample on every maze is -3.1 points (beyond the
    # 1-point margin); one fewer on every tenth maze is -0.3 points (within it)
    assert judged("no_cost", base - 1, base)["verdict"] == "contradicted"
    small = base - (np.arange(len(sources)) % 10 == 0)
    j = judged("no_cost", small, base)
    assert -0.01 < j["seed_ci"].mean < 0 and j["verdict"] == "reproduced"
    # +5 correct samples on a single maze in every seed: the seeds agree, the mazes do not
    one = base.copy()
    one[:, 0] += 5
    j = judged("transfer", one, base)
    assert j["p_t_holm"] < 0.05 and j["p_sf_holm"] < 0.05 and j["maze_ci"].lo <= 0
    assert j["verdict"] == "inconclusive"
    # an effect on 5x5 alone is no effect on the unseen sizes
    only5 = base + np.array([4 if s == "maze_5x5" else 0 for s in sources])
    assert judged("explore", only5, base)["verdict"] == "reproduced"
    gen = judged("generalise", only5, base)
    assert gen["diffs"] == pytest.approx([0.0] * seeds) and gen["verdict"] == "inconclusive"
    fake = [dict(gen, claim=by_key["explore"], diffs=list(np.linspace(0.01, 0.02, seeds))),
            dict(gen, claim=by_key["explore"], diffs=[float("nan")] * seeds)]
    out = claims.judge_holm(fake)
    assert np.isnan(out[1]["p_t"]) and out[0]["p_t_holm"] == pytest.approx(2 * out[0]["p_t"])


def test_maze_bootstrap_with_undefined_mazes():
    """A metric undefined on some mazes (NaN): the interval is centred on the seed mean of each run's mean
    over its defined mazes, and equals the plain bootstrap when nothing is undefined."""
    rng = np.random.default_rng(0)
    a, b = rng.random((4, 50)), rng.random((4, 50))
    plain = stats.maze_bootstrap(a, b)
    a_nan = a.copy()
    a_nan[0, :5] = np.nan
    ci = stats.maze_bootstrap(a_nan, b)
    expected = np.mean(np.nanmean(a_nan, 1) - b.mean(1))
    assert ci.mean == pytest.approx(expected) and ci.lo < expected < ci.hi
    assert abs((ci.hi - ci.lo) - (plain.hi - plain.lo)) < 0.3 * (plain.hi - plain.lo)


def test_second_design_report_section(tmp_path):
    """The report of a second-design study: tables at steps 200 and 300, the Holm claims table, the
    pass@k-over-training figure."""
    from experiments.reproduce import study_report

    records, sources = _second_records(seeds=4, mazes=4)
    spec = dataclasses.replace(study.make_spec("second"), test_per_size=4)
    study.write_manifest(spec, sources, str(tmp_path))
    for r in records:
        r.update(design="second", design_fingerprint=spec.fingerprint(),
                 wall_s=1.0, machine="test", commit="abc", curves={**r["curves"], "reward": [], "length": []})
        study.write_record(study.record_path(spec, r["method"], r["seed"], str(tmp_path)), r)
    text = "\n".join(study_report.section("second", str(tmp_path), str(tmp_path)))
    assert "Pass@k, analytical, k = 4 (step 200)" in text and "Pass@k -> Pass@1 (step 300)" in text
    assert "sign-flip p (Holm)" in text and "rise_k16: Pass@k training raises pass@16" in text
    assert "Provisional" in text and (tmp_path / "study_second_pass_at_k_training.png").exists()


def test_analyses_outputs_and_quick_study(analysed, tmp_path):
    """The analyses' files and a quick study (2 methods x 2 seeds, 2 RL steps) assembled into RESULTS.md
    from the records alone (the run directory is deleted first); rerunning skips every recorded run."""
    import shutil

    out = analysed[0]
    spec = study.make_spec("quick", methods=["pass1", "passk_analytic"])
    records_dir = os.path.join(out, "study")
    runs = str(tmp_path / "runs")
    records = study.run(spec, runs, records_dir=records_dir, log=lambda msg: None)
    assert len(records) == 4 and {r["seed"] for r in records} == {0, 1}
    assert all(set(r["evals"]) == {"0", "1", "2"} for r in records)
    assert all(len(r["evals"]["2"]["correct"]) == 8 for r in records)  # 4 mazes x 2 sizes
    for seed in (0, 1):  # paired: one warm start per seed, shared by its methods
        assert len({r["warm_start"] for r in records if r["seed"] == seed}) == 1
    text = json.dumps(records)
    assert str(tmp_path) not in text  # no machine paths in the committed records
    shutil.rmtree(runs)
    ran = []
    assert len(study.run(spec, runs, records_dir=records_dir, log=ran.append)) == 4 and ran == []
    path = report.write(out)
    for name in ("eta.csv", "eta.png", "bootstrap_convergence.csv", "bootstrap_convergence.png",
                 "advantage_table.csv", "study_quick_curves.png", "study_quick_pass_at_k.png", "RESULTS.md"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    text = open(path).read()
    assert "Quick mode" in text and "1.732 / -0.056" in text and "| Pass@8 | 4 | 12.5%" in text
    for label in ("warm start (step 0) (2)", "Pass@1 (2)", "Pass@k, analytical (2)"):
        assert f"| {label}" in text, label
    assert "The paper's claims" in text and "Pass@k training reaches a higher pass@16" in text
    assert "complete seeds: 2 of 2" in text and "verified (step-0 evaluations identical)" in text
    assert "Exploratory results (not pre-registered)" in text and "| sign-flip p |" in text
    partial = tmp_path / "partial"  # seed 1 lacks a method: the tables stay paired on seed 0
    shutil.copytree(records_dir, partial / "study")
    os.remove(study.record_path(spec, "passk_analytic", 1, str(partial / "study")))
    text = open(report.write(str(partial))).read()
    assert "complete seeds: 1 of 2" in text and "seed(s) 1 wait for their seed" in text
    assert "| Pass@1 (1)" in text and "| Pass@1 (2)" not in text


def test_a_rebuilt_warm_start_supersedes_the_seeds_other_records(tmp_path):
    """A seed continued on a machine that rebuilt a different warm start: the seed's older records move to
    superseded/ and their methods are queued again, so the seed stays paired."""
    spec = study.make_spec("quick")
    old = dict(method="pass1", seed=0, warm_start="A", machine="m1", commit="c1")
    study.write_record(study.record_path(spec, "pass1", 0, str(tmp_path)), old)
    study.write_record(study.record_path(spec, "pass1", 1, str(tmp_path)), {**old, "seed": 1})
    os.makedirs(tmp_path / "runs" / "pass1" / "seed0")
    new = dict(method="passk_analytic", seed=0, warm_start="B", machine="m2", commit="c2")
    msgs = []
    assert study._supersede(spec, 0, new, str(tmp_path), str(tmp_path / "runs"), msgs.append) == ["pass1"]
    assert os.path.exists(tmp_path / spec.name / "superseded" / "pass1" / "seed0.json")
    assert not os.path.exists(study.record_path(spec, "pass1", 0, str(tmp_path)))
    assert os.path.exists(study.record_path(spec, "pass1", 1, str(tmp_path)))  # other seeds untouched
    assert not os.path.exists(tmp_path / "runs" / "pass1" / "seed0") and "differs" in msgs[0]
    same = dict(new, warm_start="A")
    study.write_record(study.record_path(spec, "pass1", 0, str(tmp_path)), old)
    assert study._supersede(spec, 0, same, str(tmp_path), str(tmp_path / "runs"), msgs.append) == []
    moved = study.load_superseded(spec, str(tmp_path))  # their CPU time still counts in the report
    assert [(r["method"], r["seed"], r["warm_start"]) for r in moved] == [("pass1", 0, "A")]


def test_a_stopped_run_stops_the_study_with_one_line(tmp_path, monkeypatch):
    """A run that a signal stopped (checkpointed, status "preempted") stops the study with study.Stopped,
    whose message says the same command resumes; nothing is recorded for it."""
    from passk_jax.run import trainer

    monkeypatch.setattr(trainer, "train", lambda spec, workdir, **kw: {"status": "preempted"})
    spec = study.make_spec("quick", methods=["pass1"])
    with pytest.raises(study.Stopped, match="the same command resumes it"):
        study.run(spec, str(tmp_path / "runs"), records_dir=str(tmp_path / "records"), log=lambda msg: None)
    assert not os.path.exists(study.record_path(spec, "pass1", 0, str(tmp_path / "records")))


def test_seeds_and_mazes_to_decide_known_answers():
    # mean 1, sd 1: t_{5}/sqrt(6) = 1.050 > 1 and t_{6}/sqrt(7) = 0.925 < 1, so 7 seeds
    assert stats.seeds_to_decide([0.0, 1.0, 2.0]) == (7, "reproduced")
    assert stats.seeds_to_decide([0.0, -1.0, -2.0]) == (7, "contradicted")
    assert stats.seeds_to_decide([-1.0, 0.0, 1.0]) == (None, "inconclusive")
    assert stats.seeds_to_decide([0.5]) == (None, "inconclusive")
    # non-inferiority, mean -0.005 sd 0.01, margin 0.01: needs t_{n-1}/sqrt(n) < 0.5, first at n = 18
    assert stats.seeds_to_decide([-0.015, -0.005, 0.005], kind="noninferiority", margin=0.01) == (18, "reproduced")
    # half-width 0.04 at 768 mazes, centre 0.03: 768 * (4/3)^2 = 1365.3 -> 1366
    assert stats.mazes_to_decide(stats.Interval(0.03, -0.01, 0.07), 768) == (1366, "reproduced")
    assert stats.mazes_to_decide(stats.Interval(-0.03, -0.07, 0.01), 768) == (1366, "contradicted")
    assert stats.mazes_to_decide(stats.Interval(0.0, -0.02, 0.02), 768) == (None, "inconclusive")
    # non-inferiority: centre -0.004 is 0.006 above -margin (and 0.004 below 0); half 0.01 -> 768 * (10/6)^2
    # = 2133.3 -> 2134 mazes to reproduce, before the 4800 that "contradicted" would need
    assert stats.mazes_to_decide(stats.Interval(-0.004, -0.014, 0.006), 768, kind="noninferiority",
                                 margin=0.01) == (2134, "reproduced")


def test_second_design_pilot_summary_counts_none_some_all():
    """The pilot's per-maze split: solved by none, some or all of the N = 32 responses, per size and over all."""
    from experiments.reproduce import pilot_second

    details = {"correct": [0, 5, 32, 31, 0, 1], "data_source": ["maze_5x5"] * 4 + ["maze_7x7"] * 2}
    s = pilot_second.summarise(details)
    assert s["all"]["mazes"] == 6 and s["all"]["none"] == pytest.approx(2 / 6)
    assert s["all"]["some"] == pytest.approx(3 / 6) and s["all"]["all"] == pytest.approx(1 / 6)
    assert s["maze_7x7"] == pytest.approx({"mazes": 2, "none": 0.5, "some": 0.5, "all": 0.0, "pass@1": 1 / 64,
                                           "pass@4": 4 / 64, "pass@32": 0.5})
    assert s["maze_5x5"]["pass@32"] == 0.75 and s["maze_5x5"]["pass@1"] == pytest.approx((5 + 32 + 31) / 128)


def test_run_pinned_refuses_a_missing_commit_or_design():
    """experiments/reproduce/run_pinned.sh: usage and an unknown commit are one line each, before any worktree
    or run exists."""
    import subprocess

    script = os.path.join(os.path.dirname(study.HERE), "reproduce", "run_pinned.sh")
    out = subprocess.run(["bash", script], capture_output=True, text=True, timeout=30)
    assert out.returncode != 0 and "usage: run_pinned.sh DESIGN COMMIT" in out.stderr
    out = subprocess.run(["bash", script, "second", "0" * 40], capture_output=True, text=True, timeout=30)
    assert out.returncode != 0 and "unknown commit" in out.stderr, out.stderr
