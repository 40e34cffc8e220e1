"""experiments.reproduce: the exact analyses (eta argmax, bootstrap convergence, advantage values) and the
training study's quick mode end to end (RESULTS.md with every method row)."""
import os

import numpy as np
import pytest

from experiments.reproduce import analyses, report, study


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
    spec = study.make_spec(quick=True, steps=5)
    c = study.run_config(spec, study.METHOD_BY_KEY["passk_then_pass1"], 3, train_file="a.jsonl",
                         test_file="b.jsonl", num_test=7, cache_dir=str(tmp_path))
    assert [s["steps"] for s in c.train.stages] == [2, 3]  # 20 + 20 of 40 -> 2.5 rounded half to even
    assert c.train.stages[0]["step"]["k"] == spec.k and c.train.stages[1]["step"]["k"] == 1
    pass1 = study.run_config(spec, study.METHOD_BY_KEY["pass1"], 0, train_file="a", test_file="b", num_test=1,
                             cache_dir=str(tmp_path))
    assert pass1.step.k == 1 and pass1.step.estimator == "grpo"
    assert c.seed == 3 and c.task.options.train_files == "a.jsonl" and c.eval.num_prompts == 7
    with pytest.raises(ValueError, match="unknown method"):
        study.make_spec(methods=["nope"])


def test_judge():
    assert study.mean_se([1.0, 2.0, 3.0]) == pytest.approx((2.0, 1 / np.sqrt(3)))
    assert report.judge((0.5, 0.01), (0.2, 0.01), 3)[1] == "reproduced"
    assert report.judge((0.2, 0.01), (0.5, 0.01), 3)[1] == "contradicted"
    assert report.judge((0.21, 0.05), (0.2, 0.05), 3)[1].startswith("inconclusive")
    assert "2 SE = 7.07)" in report.judge((0.21, 0.025), (0.2, 0.025), 3, scale=100.0)[1]  # printed in the unit of Δ
    assert report.judge((0.2, float("nan")), (0.2, float("nan")), 1)[1].startswith("single seed")


def test_analyses_outputs_and_quick_study(analysed, tmp_path):
    """The analyses' files and a quick study (2 methods, 1 seed, 2 RL steps) assembled into RESULTS.md."""
    out = analysed[0]
    spec = study.make_spec(quick=True, methods=["pass1", "passk_analytic"])
    records = study.run(spec, str(tmp_path / "runs"), log=lambda msg: None)
    agg = study.aggregate(spec, records)
    assert agg["warm_start"]["ok"], agg["warm_start"]
    study.write_outputs(agg, out)
    path = report.write(out)
    for name in ("eta.csv", "eta.png", "bootstrap_convergence.csv", "bootstrap_convergence.png",
                 "advantage_table.csv", "study.json", "study_table.csv", "study_pass_at_k.png",
                 "study_curves.png", "RESULTS.md"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    text = open(path).read()
    table7 = text.split("### 2.1")[1].split("### 2.2")[0]
    for label in ("warm start", "Pass@1", "Pass@k, analytical"):
        assert f"| {label}" in table7, label
    assert "Quick mode" in text and "1.732 / -0.056" in text and "| Pass@8 | 4 | 12.5%" in text
    assert "Which claims reproduced" in text and "Pass@k training reaches a higher pass@k" in text
