"""The training loop end to end on a tiny maze config: outputs, exact resume, SIGTERM, export, validation."""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import pytest

from experiments import configs
from passk_jax import metrics
from passk_jax.run import evaluation, monitor, trainer
from passk_jax.run.metric_log import read_jsonl
from passk_jax.run.spec import RunSpec

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OVERRIDES = {
    "task.options.train_sizes": (5,), "task.options.test_sizes": (5,), "task.num_train": 64,
    "rollout.prompts_per_step": 4, "rollout.num_samples": 4, "rollout.max_new_tokens": 12,
    "rollout.decode_slots": 8, "step.k": 2, "train.steps": 4, "train.checkpoint_every": 1, "train.eval_every": 2,
    "eval.num_prompts": 4, "eval.num_samples": 4,
    "sft.steps": 3, "sft.num_examples": 32, "sft.batch_size": 8, "train.samples_every": 2,
}


ANNEAL = {"step.k_schedule": ((0, 2), (2, 1))}  # the `runs` fixture's k-annealing (k = 2, 2, 1, 1)


def tiny_spec(cache_dir, **extra):
    return RunSpec.from_config(tiny_config(cache_dir, **extra))


def tiny_config(cache_dir, **extra):
    c = configs.get("passk_k4")
    for key, value in {**OVERRIDES, **extra, "sft.cache_dir": str(cache_dir)}.items():
        node = c
        *path, leaf = key.split(".")
        for part in path:
            node = node[part]
        node[leaf] = value
    return c


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One uninterrupted run and one stopped after step 2 then resumed, sharing the SFT cache; the second
    also logs to Weights & Biases in offline mode. Both anneal k from 2 to 1 at step 2 (k-annealing: the
    resumed run must pick the schedule up where it stopped)."""
    base = tmp_path_factory.mktemp("trainer")
    full, split = str(base / "full"), str(base / "split")
    wandb = {"train.wandb_project": "passk-test", "train.wandb_mode": "offline", **ANNEAL}
    out_full = trainer.train(tiny_spec(base / "cache", **ANNEAL), full)
    out_stop = trainer.train(tiny_spec(base / "cache", **wandb), split, stop_after=2)
    out_resume = trainer.train(tiny_spec(base / "cache", **wandb), split)
    return dict(full=full, split=split, out_full=out_full, out_stop=out_stop, out_resume=out_resume, base=base)


def _params(workdir):
    import orbax.checkpoint as ocp

    path = os.path.join(workdir, "checkpoints", "4", "state")
    with ocp.PyTreeCheckpointer() as ckpt:
        return ckpt.restore(path)


def test_outputs_and_report(runs):
    assert runs["out_full"]["status"] == "done" and runs["out_stop"]["status"] == "stopped"
    wd = runs["full"]
    for name in ("config.json", "metrics.jsonl", "report.md", "training_curves.png", "pass_at_k.png",
                 "eval_initial.json", "eval_final.json", "hf_export/config.json", "tokenizer/tokenizer.json"):
        assert os.path.exists(os.path.join(wd, name)), name
    assert os.listdir(os.path.join(wd, "tensorboard"))
    records = read_jsonl(os.path.join(wd, "metrics.jsonl"))
    train_recs = [r for r in records if "rollout/reward_mean" in r]
    assert [r["step"] for r in train_recs] == [1, 2, 3, 4]
    assert [r["train/k"] for r in train_recs] == [2, 2, 1, 1]  # k_schedule ((0, 2), (2, 1))
    for key in ("step/loss", "step/entropy", "step/clip_high_frac", "step/rollout_pass@k", "step/rollout_pass^k",
                "step/grad_norm",
                "step/adv_zero_prompt_frac", "rollout/length_mean", "time/sample", "time/score",
                "time/update", "perf/tokens_per_s", "verifier/train/errors", "verifier/train/timeouts",
                "verifier/train/invalid", "verifier/train/scored_total", "verifier/eval/scored"):
        assert key in train_recs[-1], key
    assert train_recs[-1]["verifier/train/scored"] == 16  # per step: P x n responses
    assert train_recs[-1]["verifier/train/scored_total"] == 4 * 16
    assert [r["phase"] for r in records if "phase" in r] == ["final"]
    assert "eval/pass@4" in train_recs[1]  # eval_every=2
    final = json.load(open(os.path.join(wd, "eval_final.json")))
    for key in ("eval/pass@1", "eval/pass@2", "eval/pass@4", "eval/greedy_accuracy", "eval/maze_5x5/pass@4",
                "eval/pass^4", "eval/pass^4_stderr", "eval/maze_5x5/pass^4"):
        assert key in final
    details = sorted(os.listdir(os.path.join(wd, "eval_details")))
    assert details == ["step_000000.json", "step_000002.json", "step_000004.json"]  # initial, eval_every, final
    last = json.load(open(os.path.join(wd, "eval_details", details[-1])))
    assert last["step"] == 4 and last["data_source"] == ["maze_5x5"] * 4
    assert np.mean(last["correct"]) / 4 == pytest.approx(final["eval/pass@1"])  # per-prompt counts of 4
    assert np.mean(last["greedy"]) == pytest.approx(final["eval/greedy_accuracy"])
    assert np.mean(last["distinct_wrong"]) == pytest.approx(final["eval/distinct_wrong_per_prompt"])
    text = open(os.path.join(wd, "report.md")).read()
    assert "| before RL: pass@k |" in text and "| after RL: pass^k |" in text and "k=4" in text
    assert "## Samples of the final evaluation" in text and "| prompt | ground truth | response |" in text


def test_samples_show_what_the_model_wrote(runs):
    """Every evaluation (steps 0, 2, 4) and every second RL step records 4 prompts x 2 responses; each
    recorded reward is what the task's verifier gives the recorded text, each answer what it reads."""
    from passk_jax.run import samples
    from passk_jax.tasks import Example
    from passk_jax.tasks.maze import MazeTask, extract_maze_answer

    wd, task = runs["full"], MazeTask(template="compact")
    assert sorted(os.listdir(os.path.join(wd, "samples"))) == [f"step_{s:06d}.jsonl" for s in (0, 2, 4)]
    phases = {s: [r["phase"] for r in samples.read(samples.path_of(wd, s))] for s in (0, 2, 4)}
    assert phases == {0: ["eval"] * 4, 2: ["train"] * 4 + ["eval"] * 4, 4: ["train"] * 4 + ["eval"] * 4}
    for step in (0, 2, 4):
        for rec in samples.read(samples.path_of(wd, step)):
            assert rec["data_source"] == "maze_5x5" and isinstance(rec["prompt"], str)
            assert len(rec["responses"]) == 2
            for resp in rec["responses"]:
                example = Example(rec["prompt"], rec["ground_truth"], rec["data_source"])
                assert resp["reward"] == task.score(example, resp["text"])
                assert resp["answer"] == extract_maze_answer(resp["text"])
                assert 1 <= resp["length"] <= 12


def test_wandb_offline_run_continues_across_the_resume(runs):
    """Both attempts of the resumed run log to the same W&B run id (offline files under WORKDIR/wandb/), with
    the metrics and the samples tables."""
    wd = runs["split"]
    run_id = open(os.path.join(wd, "wandb_run_id")).read().strip()
    attempts = sorted(os.listdir(os.path.join(wd, "wandb")))
    attempts = [a for a in attempts if a.startswith("offline-run-")]
    assert len(attempts) == 2 and all(a.endswith(f"-{run_id}") for a in attempts)
    logged = b"".join(open(os.path.join(wd, "wandb", a, f"run-{run_id}.wandb"), "rb").read() for a in attempts)
    for name in (b"eval/pass@4", b"step/loss", b"verifier/train/no_answer", b"samples/eval", b"samples/train"):
        assert name in logged, name
    tables = [f for a in attempts for _, _, files in os.walk(os.path.join(wd, "wandb", a, "files", "media"))
              for f in files if f.endswith(".table.json")]
    assert any(t.startswith("eval_") for t in tables) and any(t.startswith("train_") for t in tables)
    columns = json.load(open(next(os.path.join(root, f) for a in attempts
                                  for root, _, files in os.walk(os.path.join(wd, "wandb", a)) for f in files
                                  if f.startswith("eval_") and f.endswith(".table.json"))))["columns"]
    assert columns[:5] == ["phase", "data_source", "prompt", "ground_truth", "response"]
    assert not os.path.exists(os.path.join(runs["full"], "wandb_run_id"))  # off unless a project is set


def test_resume_is_bitwise_exact(runs):
    chex.assert_trees_all_equal(_params(runs["full"]), _params(runs["split"]))  # structure, dtypes, bits
    skip = ("time", "time/", "perf/", "sft/")  # SFT ran in one workdir, was cached in the other
    # (verifier counters are compared: per-step and cumulative counts survive the resume)
    ra = [r for r in read_jsonl(os.path.join(runs["full"], "metrics.jsonl"))]
    rb = [r for r in read_jsonl(os.path.join(runs["split"], "metrics.jsonl"))]
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    for x, y in zip(ra, rb):
        keys = {k for k in x if not k.startswith(skip)}
        assert {k: x[k] for k in keys} == {k: y[k] for k in keys}
    da, db = (os.path.join(runs[w], "eval_details") for w in ("full", "split"))
    assert sorted(os.listdir(da)) == sorted(os.listdir(db))
    for name in os.listdir(da):  # the per-prompt evaluations too, across the resume
        assert json.load(open(os.path.join(da, name))) == json.load(open(os.path.join(db, name)))


def test_export_loads_in_transformers(runs):
    import jax.numpy as jnp
    import torch
    from transformers import AutoModelForCausalLM

    from passk_jax.models import hf
    from passk_jax.models.transformer import forward, split

    path = os.path.join(runs["full"], "hf_export")
    theirs = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model, _ = hf.load_pretrained(path)
    graphdef, params = split(model)
    tokens = np.random.default_rng(0).integers(4, 90, size=(2, 10)).astype(np.int32)
    pos = np.broadcast_to(np.arange(10, dtype=np.int32), tokens.shape)
    ours, _ = forward(graphdef, params, jnp.asarray(tokens), jnp.asarray(pos), jnp.ones(tokens.shape, bool))
    with torch.no_grad():
        ref = theirs(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4)


def test_export_cli_matches_final_export(runs, tmp_path):
    from safetensors.numpy import load_file

    from experiments.export import export_run

    assert export_run(runs["full"], str(tmp_path / "hf")) == 4
    ours = load_file(str(tmp_path / "hf" / "model.safetensors"))
    final = load_file(os.path.join(runs["full"], "hf_export", "model.safetensors"))
    assert ours.keys() == final.keys()
    for name in ours:
        np.testing.assert_array_equal(ours[name], final[name])


def _copy_run(runs, name):
    dest = str(runs["base"] / name)
    shutil.copytree(runs["full"], dest)
    return dest


def _train_records(workdir, up_to=None):
    skip = ("time", "time/", "perf/", "sft/")
    return [{k: v for k, v in r.items() if not k.startswith(skip)} for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))
            if "rollout/reward_mean" in r and (up_to is None or r["step"] <= up_to)]


def test_rerun_of_a_finished_run_changes_nothing(runs, caplog):
    wd = _copy_run(runs, "rerun")
    before = open(os.path.join(wd, "metrics.jsonl")).read()
    caplog.set_level("INFO")
    out = trainer.train(tiny_spec(runs["base"] / "cache", **ANNEAL), wd)
    assert out["status"] == "done" and out["step"] == 4 and "already finished" in caplog.text
    assert open(os.path.join(wd, "metrics.jsonl")).read() == before


def test_changed_config_is_refused_before_compiling(runs):
    from passk_jax.run.workdir import WorkdirError

    wd = _copy_run(runs, "changed")
    files = {name: open(os.path.join(wd, name), "rb").read() for name in ("config.json", "metrics.jsonl")}
    with pytest.raises(WorkdirError, match=r"step\.kl_coef \(0\.0 -> 0\.1\)"):
        trainer.train(tiny_spec(runs["base"] / "cache", **ANNEAL, **{"step.kl_coef": 0.1}), wd)
    assert {name: open(os.path.join(wd, name), "rb").read() for name in files} == files
    assert sorted(int(d) for d in os.listdir(os.path.join(wd, "checkpoints")) if d.isdigit()) == [2, 3, 4]


def test_corrupt_newest_checkpoint_then_longer_resume_finishes(runs, caplog):
    """Step 4 is corrupt: it moves to checkpoints/corrupt/, the run resumes from 3, redoes step 4 exactly
    and (train.steps is resumable) goes on to step 5; the derived files describe the new end."""
    wd = _copy_run(runs, "corrupt")
    for root, _, names in os.walk(os.path.join(wd, "checkpoints", "4")):
        for name in names:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"garbage")
    caplog.set_level("INFO")
    out = trainer.train(tiny_spec(runs["base"] / "cache", **ANNEAL, **{"train.steps": 5}), wd)
    assert out["status"] == "done" and out["step"] == 5
    assert "step 4" in caplog.text and "unreadable" in caplog.text and "resuming from checkpoint step 3" in caplog.text
    assert os.listdir(os.path.join(wd, "checkpoints", "corrupt")) == ["4"]
    redone = _params(wd)  # the re-saved step 4 equals the uninterrupted run's step 4
    chex.assert_trees_all_equal(redone, _params(runs["split"]))
    full = _train_records(runs["full"])
    mine = _train_records(wd)
    assert [r["step"] for r in mine] == [1, 2, 3, 4, 5]
    assert mine[:3] == full[:3]
    evals = ("eval/", "verifier/eval/")  # eval_every=2 -> an evaluation at step 4 of 5 (not of 4)
    assert {k: v for k, v in mine[3].items() if not k.startswith(evals)} == \
        {k: v for k, v in full[3].items() if not k.startswith(evals)}
    records = read_jsonl(os.path.join(wd, "metrics.jsonl"))
    assert [(r["step"], r["phase"]) for r in records if "phase" in r] == [(5, "final")]
    final = json.load(open(os.path.join(wd, "eval_final.json")))
    assert final == {k: v for k, v in records[-1].items() if k not in ("step", "time", "phase")}
    assert "RL steps = 5" in open(os.path.join(wd, "report.md")).read()


class _OutOfRangeMaze:
    """The maze task with a verifier that returns 5.0 (outside [0, 1]) for every response."""

    def __new__(cls, **cfg):
        from passk_jax.tasks.maze import MazeTask

        task = MazeTask(**cfg)
        task.score = lambda example, response: 5.0
        return task


def test_out_of_range_rewards_are_errors_and_an_always_failing_verifier_stops(tmp_path, capsys):
    from passk_jax import tasks

    tasks.register("maze_reward_5", _OutOfRangeMaze)
    c = tiny_config(tmp_path / "cache", **{"task.name": "maze_reward_5", "task.verifier_workers": 0,
                                           "task.max_failed_steps": 2, "sft.steps": 0, "eval.greedy": False,
                                           "train.eval_every": 0})
    with pytest.raises(monitor.VerifierError, match=r"last 2 training steps failed.*outside the task's range"):
        trainer.train(RunSpec.from_config(c), str(tmp_path / "run"))
    records = read_jsonl(str(tmp_path / "run" / "metrics.jsonl"))
    step1 = next(r for r in records if r["step"] == 1)
    assert step1["verifier/train/invalid"] == step1["verifier/train/scored"] == 16
    assert step1["rollout/reward_mean"] == 0.0 and step1["step/loss"] == 0.0
    assert records[0]["verifier/eval/invalid"] == records[0]["verifier/eval/scored"] == 16
    assert not [r for r in records if r["step"] == 2]  # stopped before the second update
    out = capsys.readouterr().out
    assert "WARNING step 1 (train): 16 of 16 responses (100%) failed in the verifier" in out


@pytest.mark.parametrize("split", ["train", "test"])
def test_empty_data_file_is_named(tmp_path, split):
    from passk_jax.tasks.maze import MazeTask
    from passk_jax.tasks.verl_data import write_verl

    good = write_verl(MazeTask().examples("train", num=8, seed=0), str(tmp_path / "good.jsonl"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    c = tiny_config(tmp_path / "cache", **{"task.name": "verl"})
    files = {"train_files": good, "test_files": good, f"{split}_files": str(empty)}
    c.task.options = files
    with pytest.raises(ValueError, match=f"the {split} split is empty: task.options.{split}_files='{empty}'"):
        trainer.train(RunSpec.from_config(c), str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")  # refused before the workdir was touched


def test_eval_pass_at_k_matches_estimator():
    rng = np.random.default_rng(0)
    correct = rng.random((6, 8)) < 0.3
    out = evaluation.summarize(correct, ["a", "a", "b", "b", "b", "a"], correct.astype(float), ["x"] * 48)
    for k in (1, 2, 4, 8):
        want = np.mean([float(metrics.pass_at_k(8, int(c), k)) for c in correct.sum(1)])
        assert out[f"eval/pass@{k}"] == pytest.approx(want, abs=1e-6)
        want_b = np.mean([float(metrics.pass_at_k(8, int(c), k)) for c in correct[[2, 3, 4]].sum(1)])
        assert out[f"eval/b/pass@{k}"] == pytest.approx(want_b, abs=1e-6)
        hat = [math.comb(int(c), k) / math.comb(8, k) for c in correct.sum(1)]  # all k of 8 correct
        assert out[f"eval/pass^{k}"] == pytest.approx(np.mean(hat), abs=1e-6)
        assert out[f"eval/pass^{k}_stderr"] == pytest.approx(np.std(hat, ddof=1) / np.sqrt(6), abs=1e-6)


@pytest.mark.parametrize("key,value,needle", [
    ("step.k", 9, "k"),
    ("step.estimator", "nope", "estimator"),
    ("rollout.top_p", 0.0, "top_p"),
    ("model.preset", "huge", "model.preset"),
    ("step.num_minibatches", 3, "num_minibatches"),
    ("train.checkpoint_every", 0, "checkpoint_every"),
    ("model.attention", "flash", "model.attention"),
    ("step.logprob_chunk", -1, "logprob_chunk"),
    ("rollout.decode_slots", 17, r"rollout.decode_slots must be in \[0, 16\]"),
    ("rollout.decode_slots", 4, r"rollout.decode_slots=4 is not divisible by the data-parallel size data\*fsdp=8"),
    ("rollout.decode_layout", "gathered", "rollout.decode_layout must be one of"),
    ("model.lora_rank", -1, r"model.lora_rank must be an integer >= 0 \(0: no LoRA\), got -1"),
    ("model.lora_targets", ("q", "qkv"), "'qkv' is not a projection of the decoder"),
    ("model.lora_rank", 4, r"sft.steps=3 with model.lora_rank=4: the warm start trains every weight"),
    ("step.learning_rate", float("nan"), "step.learning_rate must be a finite number, got nan"),
    ("rollout.temperature", float("inf"), "rollout.temperature must be a finite number, got inf"),
    ("eval.temperature", float("nan"), "eval.temperature must be a finite number"),
    ("task.max_error_frac", float("nan"), "task.max_error_frac must be a finite number"),
    ("step.estimator_options", {"eta": float("-inf")}, "step.estimator_options.eta must be a finite number"),
    ("step.log_ratio_clip", float("inf"), "step.log_ratio_clip must be a finite number"),
    ("train.stages", ({"steps": 1, "step": {"eps_high": float("nan")}},),
     r"train.stages\[0\].step.eps_high must be a finite number"),
    ("step.k_schedule", ((0, 2), (4, 5)), r"step.k=5 exceeds rollout.num_samples=4"),
    ("step.k_schedule", ((0, 3), (4, 1)), r"k_schedule must start at \(0, k\) with k=2 \(step.k\), but its first"),
    ("step.k_schedule", ((0, 2), (4, 1), (4, 1)), "k_schedule steps must increase strictly"),
    ("step.k_schedule", ((0, 2), (4, 0)), "k_schedule values of k must be >= 1"),
    ("step.k_schedule", ((0, 2, 3),), r"k_schedule must be a sequence of \(step, k\) integer pairs"),
])
def test_config_validation(tmp_path, key, value, needle):
    with pytest.raises(ValueError, match=needle):
        tiny_spec(tmp_path, **{key: value})


def test_infinite_grad_clip_norm_is_allowed(tmp_path):
    assert tiny_spec(tmp_path, **{"step.grad_clip_norm": float("inf")}).step.grad_clip_norm == float("inf")
    with pytest.raises(ValueError, match="step.grad_clip_norm must be a finite number, got nan"):
        tiny_spec(tmp_path, **{"step.grad_clip_norm": float("nan")})


def test_unknown_config_and_field_messages():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-m", "experiments.run", "--config=nope"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "available configs" in out.stderr and "passk_k4" in out.stderr
    for args, needle in [
        (["--config.step.kk=1"], "error: unknown config field 'step.kk' (config 'pass1'); did you mean 'step.k'?"),
        (["--config.rollout.bogus=1"], "error: unknown config field 'rollout.bogus'"),
        (["--config.step.k=99"], "error: step.k=99 exceeds rollout.num_samples=16"),
        (["--workdir=/dev/null/run"], "error: cannot write to workdir /dev/null/run"),
    ]:
        out = subprocess.run([sys.executable, "-m", "experiments.run", "--config=pass1", *args], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 1 and needle in out.stderr, (args, out.stderr)
        assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_flag_parsing_errors_are_one_line():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-m", "experiments.run", "--config=passk_k4", "--config.seed=abc"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 1 and len(lines) == 1, out.stderr
    assert lines[0].startswith("error: flag --config.seed=abc: ") and "FATAL" not in out.stderr, out.stderr
    out = subprocess.run([sys.executable, "-m", "experiments.run", "--config=passk_k4", "--config.seed=abc",
                          "--debug"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "Traceback" in out.stderr and "config.seed" in out.stderr, out.stderr


def test_sigterm_saves_checkpoint_and_resumes(runs):
    wd = str(runs["base"] / "sigterm")
    args = [sys.executable, "-m", "experiments.run", "--config=passk_k4", f"--workdir={wd}",
            f"--config.sft.cache_dir={runs['base'] / 'cache'}", "--config.train.steps=50"]
    fmt = lambda v: f"({','.join(map(str, v))},)" if isinstance(v, tuple) else str(v)  # noqa: E731
    args += [f"--config.{k}={fmt(v)}" for k, v in OVERRIDES.items() if k != "train.steps"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen, deadline = [], time.time() + 240
    for line in proc.stdout:
        seen.append(line)
        if "step 2/50" in line or time.time() > deadline:
            break
    # a second process on the same workdir stops at once with one sentence and changes nothing
    second = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 1 and "error: workdir" in second.stderr and "is in use by another run (pid " \
        f"{proc.pid}" in second.stderr, second.stderr
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, "".join(seen) + rest
    steps = sorted(int(d) for d in os.listdir(os.path.join(wd, "checkpoints")) if d.isdigit())
    assert steps and steps[-1] >= 2
    # the same command with one more step to go (train.steps is resumable) says where it resumes and finishes
    args = [a for a in args if not a.startswith("--config.train.steps=")] + [f"--config.train.steps={steps[-1] + 1}"]
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    assert f"INFO resuming from checkpoint step {steps[-1]} of {steps[-1] + 1}" in done.stderr
    assert "done: report at" in done.stdout


@pytest.mark.parametrize("name", configs.names())
def test_every_named_config_validates(name):
    """Every named config is a valid spec; one naming a checkpoint directory that is not there (a model the user
    converts first) is refused in one sentence naming ``model.hf_path``, and is valid apart from that."""
    c = configs.get(name)
    if c.model.preset == "hf" and not c.model.hf_path:
        with pytest.raises(ValueError, match="hf_path"):
            RunSpec.from_config(c)
        return
    if c.model.hf_path and not os.path.isdir(c.model.hf_path):
        with pytest.raises(ValueError, match="model.hf_path .* is not a directory"):
            RunSpec.from_config(c)
    else:
        assert RunSpec.from_config(c).total_steps == c.train.steps
    assert RunSpec.from_config(c, host_checks=False).total_steps == c.train.steps


def test_a_finished_run_without_its_checkpoints_is_refused_before_compiling(runs):
    """A rerun must not retrain a finished run whose checkpoints were removed (it would replace its results)."""
    from passk_jax.run.workdir import WorkdirError

    wd = _copy_run(runs, "no_checkpoints")
    shutil.rmtree(os.path.join(wd, "checkpoints"))
    before = {name: open(os.path.join(wd, name), "rb").read()
              for name in ("metrics.jsonl", "eval_final.json", "report.md", "hf_export/model.safetensors")}
    with pytest.raises(WorkdirError, match="of step 4 but it has no checkpoint"):
        trainer.train(tiny_spec(runs["base"] / "cache", **ANNEAL), wd)
    assert {name: open(os.path.join(wd, name), "rb").read() for name in before} == before
    assert sorted(os.listdir(os.path.join(wd, "eval_details"))) == [f"step_{s:06d}.json" for s in (0, 2, 4)]


def test_a_resume_keeps_results_until_it_recomputes_them(runs, caplog):
    """Step 4 is corrupt, so the run resumes from 3; stopped there, every result of the finished run is still
    in place (nothing is deleted up front); a torn last row is repaired and reported; the finished rerun
    then replaces the rows with identical ones."""
    wd = _copy_run(runs, "keep")
    shutil.move(os.path.join(wd, "checkpoints", "4"), os.path.join(wd, "checkpoints_4_aside"))
    os.makedirs(os.path.join(wd, "checkpoints", "corrupt"))
    shutil.move(os.path.join(wd, "checkpoints_4_aside"), os.path.join(wd, "checkpoints", "corrupt", "4"))
    metrics = os.path.join(wd, "metrics.jsonl")
    lines = open(metrics).readlines()
    with open(metrics, "w") as f:  # the final row torn mid-write
        f.writelines(lines[:-1] + [lines[-1][:40]])
    before = {name: open(os.path.join(wd, name), "rb").read()
              for name in ("eval_final.json", "report.md", "hf_export/model.safetensors", "eval_details/step_000004.json")}
    caplog.set_level("INFO")
    out = trainer.train(tiny_spec(runs["base"] / "cache", **ANNEAL), wd, stop_after=3)
    assert out["status"] == "stopped" and out["step"] == 3
    assert f"dropped 1 torn row(s) left by an interrupted write: line {len(lines)} (40 bytes)" in caplog.text
    assert {name: open(os.path.join(wd, name), "rb").read() for name in before} == before
    assert open(metrics).readlines() == lines[:-1]
    out = trainer.train(tiny_spec(runs["base"] / "cache", **ANNEAL), wd)
    assert out["status"] == "done" and out["step"] == 4
    assert _train_records(wd) == _train_records(runs["full"])
    records = read_jsonl(metrics)
    assert [(r["step"], r.get("phase")) for r in records][-2:] == [(4, None), (4, "final")]
    final = json.load(open(os.path.join(wd, "eval_final.json")))
    assert final == {k: v for k, v in records[-1].items() if k not in ("step", "time", "phase")}
    assert final == json.load(open(os.path.join(runs["full"], "eval_final.json")))


@pytest.mark.parametrize("key, value, needle", [
    ("rollout.max_new_tokens", 100000, r"rollout.max_new_tokens=100000 leaves no room for a prompt in the model "
                                       r"context of 256 tokens \(model.max_len\)"),
    ("model.max_len", 20, r"exceeds the model context of 20 tokens \(model.max_len\)"),
])
def test_a_config_that_cannot_fit_fails_before_the_warm_start(tmp_path, key, value, needle):
    """Checked against the tokenized prompts before anything compiles: no workdir, no cache entry."""
    with pytest.raises(ValueError, match=needle):
        trainer.train(tiny_spec(tmp_path / "cache", **{key: value}), str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run") and not os.path.exists(tmp_path / "cache")


def test_an_unwritable_cache_is_a_warning_and_long_prompts_can_be_skipped(tmp_path, caplog):
    """The warm start is computed and used when its cache cannot be written (no hang at exit); a data row
    too long for the context is left out and counted under task.long_prompts='skip'."""
    from passk_jax.tasks.maze import MazeTask
    from passk_jax.tasks.verl_data import write_verl

    examples = MazeTask(template="compact", train_sizes=(5,)).examples("train", num=16, seed=0)
    long = examples[0].__class__("#" * 300, examples[0].ground_truth, examples[0].data_source)
    data = write_verl(examples + [long], str(tmp_path / "train.jsonl"))
    (tmp_path / "file").write_text("not a directory")
    c = tiny_config(tmp_path / "file" / "cache", **{"task.long_prompts": "skip", "train.steps": 1,
                                                     "train.eval_every": 0})
    c.task.options = {"template": "compact", "train_files": data, "test_files": data}
    caplog.set_level("INFO")
    out = trainer.train(RunSpec.from_config(c), str(tmp_path / "run"))
    assert out["status"] == "done"
    assert "cannot write to sft.cache_dir" in caplog.text and "not cached" in caplog.text
    assert "left out 1 of 17 train prompt(s)" in caplog.text and f"{data}:17" in caplog.text
    first = read_jsonl(str(tmp_path / "run" / "metrics.jsonl"))
    step0 = {k: v for r in first if r["step"] == 0 for k, v in r.items()}
    assert step0["data/train/skipped_long_prompts"] == 1.0 and step0["data/test/skipped_long_prompts"] == 0.0  # the first 4 rows
    assert step0["sft/final_loss"] > 0
