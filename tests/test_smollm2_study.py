"""experiments.smollm2_study: its run configs validate, and its report judges synthetic records with known
answers (the real runs take CPU hours; their records are committed)."""
import json
import os

import numpy as np
import pytest

from experiments.smollm2_study import report, study
from passk_jax.run.spec import RunSpec


def test_run_configs_are_the_named_config_with_the_design(tmp_path):
    for method, estimator, k in (("pass1", "grpo", 1), ("passk_analytic", "passk_analytic", 4)):
        c = study.run_config(study.MAIN, method, 2, train_file="tr.jsonl", test_file="te.jsonl", model_path="m")
        spec = RunSpec.from_config(c, host_checks=False)
        step = spec.stages[0].step
        assert (step.estimator, step.k, spec.seed) == (estimator, k, 2)
        assert spec.task.options["test_files"] == "te.jsonl" and spec.eval.num_prompts == 256
        assert spec.train.steps == study.MAIN.steps and spec.model.hf_path == "m"
    assert study.MAIN.fingerprint() != study.QUICK.fingerprint()


def _record(method, seed, before, after, n=8, steps=12):
    evals = {"0": {"correct": list(map(int, before))}, str(steps): {"correct": list(map(int, after))}}
    return dict(method=method, seed=seed, steps=steps, num_samples=n, warm_start="pretrained", evals=evals,
                design_fingerprint=study.MAIN.fingerprint(), wall_s=100.0, machine="cpu", commit="abc",
                curves={"entropy": [[t, 0.5] for t in range(1, steps + 1)]})


def test_report_on_synthetic_records_with_known_answer(tmp_path):
    """Three seeds, 256 prompts: Pass@k training adds one correct sample out of 8 on every prompt (pass@1 up
    12.5 points), Pass@1 training changes nothing: every claim about Pass@k is decided in its favour."""
    rng = np.random.default_rng(0)
    records_dir = str(tmp_path)
    sources = ["gym_basic_arithmetic"] * 256
    os.makedirs(os.path.join(records_dir, "main"))
    json.dump({"sources": sources}, open(os.path.join(records_dir, "main", "design.json"), "w"))
    for seed in range(3):
        base = rng.integers(0, 7, 256)
        for method, after in (("pass1", base), ("passk_analytic", base + 1)):
            path = study.record_path(study.MAIN, method, seed, records_dir)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            json.dump(_record(method, seed, base, after), open(path, "w"))
    records = study.load_records(study.MAIN, records_dir)
    assert len(records) == 6
    up = study.rise(records, "passk_analytic", study.claims.Metric("pass@1"), sources)
    assert up["verdict"] == "reproduced" and up["seed_ci"].lo == pytest.approx(0.125)
    flat = study.rise(records, "pass1", study.claims.Metric("pass@8"), sources)
    assert flat["verdict"] == "inconclusive" and flat["prompt_ci"].hi == pytest.approx(0.0)
    text = open(report.write(study.MAIN, records_dir)).read()
    assert "Runs recorded: 6 of 6" in text
    assert "| Pass@k training does not cost pass@1 (non-inferior within 2 points) | 3 | +12.5 |" in text
    assert text.count("**reproduced**") == 4  # explore, no_cost, and both of Pass@k's rises
    assert "0.17 h wall for 6 runs" in text
