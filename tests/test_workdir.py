"""A workdir belongs to one run: the lock (live, stale after SIGKILL), config ownership, moving a run aside."""
import json
import os
import signal
import subprocess
import sys

import pytest

from passk_jax.run import workdir as wd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = {"seed": 0, "step": {"k": 4, "kl_coef": 0.0, "estimator_options": {}}, "train": {"steps": 40}}


def test_lock_is_exclusive_and_released(tmp_path):
    first = wd.RunLock(str(tmp_path))
    assert first.acquire() is None
    with pytest.raises(wd.WorkdirError, match=f"in use by another run \\(pid {os.getpid()} on "):
        wd.RunLock(str(tmp_path)).acquire()  # a second open file description conflicts, in-process too
    first.release()
    again = wd.RunLock(str(tmp_path))
    assert again.acquire() is None  # a clean release leaves no owner behind
    again.release()


def test_lock_held_by_another_process(tmp_path):
    code = ("import sys, time; from passk_jax.run.workdir import RunLock; RunLock(sys.argv[1]).acquire(); "
            "print('locked', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(wd.WorkdirError, match=f"pid {proc.pid}"):
            wd.claim(str(tmp_path), CONFIG)
        assert not os.path.exists(tmp_path / "config.json")  # nothing written by the refused run
    finally:
        proc.kill()
        proc.wait()
    lock = wd.claim(str(tmp_path), CONFIG)  # the kernel dropped the dead owner's lock
    lock.release()


def test_stale_lock_after_sigkill_is_taken_over(tmp_path, caplog):
    code = ("import os, signal, sys; from passk_jax.run.workdir import RunLock; RunLock(sys.argv[1]).acquire(); "
            "os.kill(os.getpid(), signal.SIGKILL)")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT)
    assert proc.returncode == -signal.SIGKILL
    lock = wd.RunLock(str(tmp_path))
    stale = lock.acquire()
    assert stale is not None and "pid" in stale
    lock.release()
    caplog.set_level("INFO")
    os.remove(tmp_path / ".lock")
    with open(tmp_path / ".lock", "w") as f:
        f.write("pid 1 on elsewhere since then\n")
    wd.claim(str(tmp_path), CONFIG).release()
    assert "did not exit cleanly" in caplog.text


def test_changed_config_is_refused_naming_fields(tmp_path):
    wd.claim(str(tmp_path), CONFIG).release()
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    changed = json.loads(json.dumps(CONFIG))
    changed["step"]["kl_coef"] = 0.1
    changed["step"]["estimator_options"] = {"eta": 1}
    before = (tmp_path / "config.json").read_text()
    with pytest.raises(wd.WorkdirError, match="different config") as err:
        wd.claim(str(tmp_path), changed)
    assert "step.kl_coef (0.0 -> 0.1)" in str(err.value) and "step.estimator_options.eta (null -> 1)" in str(err.value)
    assert "--new_run" in str(err.value) and "train.steps" not in str(err.value)
    assert (tmp_path / "config.json").read_text() == before
    resumable = json.loads(json.dumps(CONFIG))
    resumable["train"]["steps"] = 80  # a longer run of the same config resumes
    wd.claim(str(tmp_path), resumable).release()
    assert json.loads((tmp_path / "config.json").read_text())["train"]["steps"] == 80


def test_a_field_added_at_its_default_resumes_an_older_workdir(tmp_path):
    """A config.json written before a field existed resumes under a config that sets the field to the
    library's default (the old run used it); any other value of the new field is a different config."""
    from passk_jax.run.spec import field_defaults

    defaults = field_defaults()
    wd.claim(str(tmp_path), CONFIG).release()
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    newer = json.loads(json.dumps(CONFIG))
    newer["step"].update(dual_clip=None, temperature=1.0, ratio_level="token")
    assert {"step.dual_clip", "step.temperature", "step.ratio_level"} <= set(defaults)
    with pytest.raises(wd.WorkdirError):  # without the defaults every added field differs
        wd.claim(str(tmp_path), newer)
    wd.claim(str(tmp_path), newer, defaults=defaults).release()
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    newer["step"]["temperature"] = 0.7
    with pytest.raises(wd.WorkdirError, match=r"step.temperature \(null -> 0.7\)"):
        wd.claim(str(tmp_path), newer, defaults=defaults)


def test_every_step_field_can_be_set_from_the_command_line():
    """The base config names every StepConfig field (``--config.step.FIELD`` is checked against the config's
    fields), at the library's default unless the base sets it."""
    import dataclasses

    from experiments import configs
    from experiments.cli import config_fields
    from passk_jax.rl.step import StepConfig
    from passk_jax.run.spec import RunSpec

    c = configs.get("passk_k4")
    assert {f"step.{f.name}" for f in dataclasses.fields(StepConfig)} <= set(config_fields(c))
    c.step.dual_clip = 3.0  # a None default takes its declared type
    c.step.ratio_level = "sequence"
    assert RunSpec.from_config(c).step.dual_clip == 3.0


def test_new_run_moves_the_old_run_aside(tmp_path):
    wd.claim(str(tmp_path), CONFIG).release()
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "3").mkdir()
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    changed = {**CONFIG, "seed": 1}
    lock = wd.claim(str(tmp_path), changed, new_run=True)
    lock.release()
    moved = os.listdir(tmp_path / wd.PREVIOUS)
    assert len(moved) == 1
    old = tmp_path / wd.PREVIOUS / moved[0]
    assert sorted(os.listdir(old)) == ["checkpoints", "config.json", "metrics.jsonl"]
    assert json.loads((old / "config.json").read_text())["seed"] == 0
    assert json.loads((tmp_path / "config.json").read_text())["seed"] == 1
    assert sorted(os.listdir(tmp_path)) == [".lock", "config.json", wd.PREVIOUS]
    wd.claim(str(tmp_path), CONFIG, new_run=True).release()  # a second move keeps the first
    assert len(os.listdir(tmp_path / wd.PREVIOUS)) == 2


def test_run_files_without_config_are_refused(tmp_path):
    (tmp_path / "checkpoints" / "3").mkdir(parents=True)
    with pytest.raises(wd.WorkdirError, match="no config.json"):
        wd.claim(str(tmp_path), CONFIG)


def test_a_run_that_recorded_nothing_takes_the_new_config(tmp_path):
    wd.claim(str(tmp_path), CONFIG).release()  # e.g. the model failed to load: config.json and nothing else
    (tmp_path / "checkpoints").mkdir()
    wd.claim(str(tmp_path), {**CONFIG, "seed": 5}).release()
    assert json.loads((tmp_path / "config.json").read_text())["seed"] == 5


def test_unwritable_workdir(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(wd.WorkdirError, match="cannot write to workdir"):
        wd.claim(str(tmp_path / "file" / "run"), CONFIG)


def test_closest_fields():
    fields = ["step", "step.k", "step.kl_coef", "rollout", "rollout.num_samples", "rollout.top_p"]
    assert wd.closest_fields("step.kk", fields)[0] == "step.k"
    assert wd.closest_fields("rollout.num_sample", fields) == ["rollout.num_samples"]
    assert wd.closest_fields("stepp.k", fields) == ["step.k"]
    assert wd.closest_fields("rollout.bogus", fields) == []
