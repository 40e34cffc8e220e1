"""Faults a user meets, each checked without training: results a resume must not replace, rows of a torn
metrics.jsonl, prompts that do not fit the model context, a full disk, and the warm-start cache key."""
import errno
import json
import os

import pytest

from experiments import configs
from passk_jax.run import workdir as wd
from passk_jax.run.data import check_prompts
from passk_jax.run.metric_log import MetricWriter, read_jsonl, repair_jsonl
from passk_jax.run.spec import RunSpec
from passk_jax.tasks import get as get_task
from passk_jax.tokenizer import build_char_tokenizer, encode_prompt, prompt_lengths
from passk_jax.tasks.verl_data import load_verl, write_verl

CONFIG = {"seed": 0, "train": {"steps": 40, "checkpoint_every": 10}, "step": {"k": 4}}


def _rows(path, steps, final=None):
    with open(path, "w") as f:
        for s in steps:
            f.write(json.dumps({"step": s, "time": 0.0, "x": float(s)}) + "\n")
        if final is not None:
            f.write(json.dumps({"step": final, "time": 0.0, "phase": "final", "x": -1.0}) + "\n")


def _checkpoints(path, *steps, corrupt=()):
    for s in steps:
        os.makedirs(os.path.join(path, "checkpoints", str(s)))
    for s in corrupt:
        os.makedirs(os.path.join(path, "checkpoints", "corrupt", s))


def _finished_run(path):
    wd.claim(str(path), CONFIG).release()
    _rows(path / "metrics.jsonl", range(41), final=40)
    for name in ("eval_final.json", "report.md"):
        (path / name).write_text("{}")
    (path / "hf_export").mkdir()


def _snapshot(path):
    return {os.path.relpath(os.path.join(r, f), path): open(os.path.join(r, f), "rb").read()
            for r, _, files in os.walk(path) for f in files if f != ".lock"}


# ------------------------------------------------------------------ results vs checkpoints (claim time)
def test_finished_run_without_its_checkpoints_is_refused_and_untouched(tmp_path):
    _finished_run(tmp_path)
    before = _snapshot(tmp_path)
    with pytest.raises(wd.WorkdirError, match=r"final results \(eval_final.json, report.md, hf_export\) of step "
                                              r"40 but it has no checkpoint.*--new_run"):
        wd.claim(str(tmp_path), CONFIG)
    _checkpoints(tmp_path, 20, 30)  # the final checkpoint is missing: still refused
    with pytest.raises(wd.WorkdirError, match="its newest checkpoint is step 30, so resuming would train again "
                                              "from step 30"):
        wd.claim(str(tmp_path), CONFIG)
    assert _snapshot(tmp_path) == before
    wd.claim(str(tmp_path), CONFIG, new_run=True).release()  # --new_run moves it aside, nothing deleted
    (moved,) = os.listdir(tmp_path / wd.PREVIOUS)
    assert _snapshot(tmp_path / wd.PREVIOUS / moved) == before


def test_checkpoints_a_crash_can_explain_resume(tmp_path):
    """Rows up to two checkpoint intervals past the newest checkpoint are what an interrupted run leaves (one
    save in flight); a quarantined (corrupt) final checkpoint counts as present."""
    wd.claim(str(tmp_path), CONFIG).release()
    _rows(tmp_path / "metrics.jsonl", range(30))
    _checkpoints(tmp_path, 10)
    wd.claim(str(tmp_path), CONFIG).release()  # rows 11..29: the save of 20 in flight when killed
    _rows(tmp_path / "metrics.jsonl", range(31))
    wd.claim(str(tmp_path), CONFIG).release()  # row 30 written, then the save of 30 waited for 20, which failed
    _rows(tmp_path / "metrics.jsonl", range(32))
    with pytest.raises(wd.WorkdirError, match="metrics.jsonl rows up to step 31 but its newest checkpoint is step 10"):
        wd.claim(str(tmp_path), CONFIG)
    # checkpoint_every may change between attempts: the larger one explains the gap
    wd.claim(str(tmp_path), {**CONFIG, "train": {"steps": 40, "checkpoint_every": 20}}).release()
    _finished_run(tmp_path)
    _checkpoints(tmp_path, 30, corrupt=("40",))
    wd.claim(str(tmp_path), CONFIG).release()


def test_an_attempt_that_failed_before_training_leaves_the_workdir_free(tmp_path):
    """Step-0 records (the initial evaluation) of another config move to previous_runs/; the same config
    keeps them (they are replaced when recomputed)."""
    wd.claim(str(tmp_path), CONFIG).release()
    _rows(tmp_path / "metrics.jsonl", [0, 0])
    (tmp_path / "eval_initial.json").write_text("{}")
    (tmp_path / "checkpoints").mkdir()
    wd.claim(str(tmp_path), CONFIG).release()
    assert (tmp_path / "eval_initial.json").exists()
    other = {**CONFIG, "seed": 3}
    wd.claim(str(tmp_path), other).release()
    (moved,) = os.listdir(tmp_path / wd.PREVIOUS)
    assert sorted(os.listdir(tmp_path / wd.PREVIOUS / moved)) == ["checkpoints", "config.json", "eval_initial.json",
                                                                  "metrics.jsonl"]
    assert json.loads((tmp_path / "config.json").read_text())["seed"] == 3
    assert not (tmp_path / "metrics.jsonl").exists()


# ------------------------------------------------------------------ metrics.jsonl
def test_resumed_rows_replace_the_old_ones_only_when_recomputed(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _rows(path, range(7), final=6)
    w = MetricWriter(str(tmp_path), tensorboard=False, enabled=True)
    w.replace_after(3)
    assert [r["step"] for r in read_jsonl(path)] == [0, 1, 2, 3, 4, 5, 6, 6]  # nothing dropped up front
    w.write(4, {"x": 40.0})
    records = read_jsonl(path)
    assert [(r["step"], r["x"]) for r in records] == [(0, 0), (1, 1), (2, 2), (3, 3), (4, 40), (5, 5), (6, 6), (6, -1)]
    for step in (5, 6):
        w.write(step, {"x": 10.0 * step})
    assert [(r["step"], r.get("phase")) for r in read_jsonl(path)][-2:] == [(6, None), (6, "final")]
    w.write(6, {"x": -2.0}, phase="final")
    w.write(7, {"x": 70.0})  # past the old rows: plain appends
    records = read_jsonl(path)
    assert [(r["step"], r["x"]) for r in records] == [(0, 0), (1, 1), (2, 2), (3, 3), (4, 40), (5, 50), (6, 60),
                                                      (6, -2), (7, 70)]


def test_a_torn_last_row_is_repaired_and_reported(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _rows(path, range(3))
    whole = path.read_bytes()
    assert repair_jsonl(str(path)) is None and path.read_bytes() == whole
    path.write_bytes(whole + b'{"step": 3, "time": 0.0, "x": 3.')
    message = repair_jsonl(str(path))
    assert message == f"{path}: dropped 1 torn row(s) left by an interrupted write: line 4 (32 bytes)."
    assert path.read_bytes() == whole
    path.write_bytes(whole[:-1])  # a whole last row without its newline is kept
    assert "missing newline" in repair_jsonl(str(path)) and path.read_bytes() == whole


# ------------------------------------------------------------------ prompts vs the model context
def _spec(**overrides):
    c = configs.get("passk_k4")
    c.rollout.max_new_tokens = 24
    for key, value in overrides.items():
        section, leaf = key.split(".")
        c[section][leaf] = value
    return RunSpec.from_config(c, host_checks=False)


def test_prompt_lengths_match_encode_prompt():
    tok = build_char_tokenizer()
    prompts = ["abc", "S..\n.E*", "x" * 100]
    assert prompt_lengths(tok, prompts, batch=2) == [len(encode_prompt(tok, p)) for p in prompts]


def test_a_prompt_longer_than_the_context_names_file_and_line(tmp_path):
    tok, task = build_char_tokenizer(), get_task("verl")
    examples = get_task("maze", train_sizes=(5,)).examples("train", num=4, seed=0)
    longest = max(len(encode_prompt(tok, task.render(e))) for e in examples)
    long = examples[2].__class__("#" * 300, examples[2].ground_truth, examples[2].data_source)
    path = write_verl(examples[:2] + [long] + examples[2:], str(tmp_path / "train.jsonl"))
    rows = load_verl(path)
    spec = _spec()
    with pytest.raises(ValueError, match=rf"^{path}:3: the prompt has 301 tokens, which with "
                                         r"rollout.max_new_tokens=24 exceeds the model context of 256 tokens "
                                         r"\(model.max_len\); .*task.long_prompts='skip'"):
        check_prompts(spec, task, tok, 256, "model.max_len", {"train": rows, "test": rows[:1]})
    kept, counts = check_prompts(_spec(**{"task.long_prompts": "skip"}), task, tok, 256, "model.max_len",
                                 {"train": rows, "test": rows[:1]})
    assert [e.prompt for e in kept["train"]] == [e.prompt for e in examples]
    assert counts == {"data/train/skipped_long_prompts": 1.0, "data/test/skipped_long_prompts": 0.0}
    with pytest.raises(ValueError, match="rollout.max_new_tokens=24 leaves no room for a prompt in the model "
                                         r"context of 24 tokens \(model.max_len\)"):
        check_prompts(spec, task, tok, 24, "model.max_len", {"train": rows})
    with pytest.raises(ValueError, match="train example 0 of task 'maze'"):  # generated: split and index
        check_prompts(spec, get_task("maze", train_sizes=(5,)), tok, longest + 23, "model.max_len",
                      {"train": examples})


# ------------------------------------------------------------------ a full disk, as one sentence
def test_disk_full_is_one_sentence_naming_path_and_free_space(tmp_path):
    err = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "metrics.jsonl"))
    message = wd.disk_full_message(err)
    assert message.startswith(f"no space left on the device while writing {tmp_path / 'metrics.jsonl'} (")
    assert " free of " in message and message.endswith("resumes from its last complete checkpoint.")
    ckpt = tmp_path / "checkpoints" / "20.orbax-checkpoint-tmp" / "state.orbax-checkpoint-tmp" / "d" / "abc"
    storage = ValueError(f'RESOURCE_EXHAUSTED: Error writing "params.x" in OCDBT database at local file '
                         f'"{ckpt.parent}/": Failed writing: "{ckpt}": Failed to write 645832 bytes to file 17: '
                         "No space left on device [os_error_code='28']")
    try:
        raise RuntimeError("save failed") from storage
    except RuntimeError as chained:
        message = wd.disk_full_message(chained)
    assert f"while writing {tmp_path / 'checkpoints' / '20'} (" in message
    assert wd.disk_full_message(ValueError("a bad value")) is None
    assert wd.disk_full_message(OSError(errno.EACCES, "Permission denied", "/x")) is None


# ------------------------------------------------------------------ the warm-start cache key
def test_warm_start_key_ignores_where_the_cache_lives():
    from passk_jax.run.trainer import warm_start_key

    base = _spec()
    moved = _spec(**{"sft.cache_dir": "/elsewhere/cache", "task.verifier_workers": 0})
    assert warm_start_key(base, "cfg", 0) == warm_start_key(moved, "cfg", 0)
    assert warm_start_key(base, "cfg", 0) != warm_start_key(_spec(**{"sft.steps": 7}), "cfg", 0)
    assert warm_start_key(base, "cfg", 0) != warm_start_key(base, "cfg", 1)


def test_cli_prints_a_full_disk_as_one_line_and_drops_storage_tracebacks(tmp_path, capsys):
    """A fault injected at the write call (this machine cannot be assumed to mount a small filesystem): the
    entry point prints one ``error:`` line; Orbax's background-thread ERROR records are dropped."""
    import logging

    from experiments import cli

    cli.show_progress_messages()
    record = logging.LogRecord("absl", logging.ERROR, "/x/site-packages/orbax/checkpoint/future.py", 1,
                               "save failed", None, None)
    assert not logging.getLogger("absl").filter(record)
    record.pathname = "/x/site-packages/other/module.py"
    assert logging.getLogger("absl").filter(record)

    def main(argv):
        with open(tmp_path / "metrics.jsonl", "a"):
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "metrics.jsonl"))

    with pytest.raises(SystemExit) as stop:
        cli.one_line_errors(main)(["run"])
    assert stop.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: no space left on the device while writing {tmp_path}")


def test_an_extended_run_that_crashed_resumes(tmp_path):
    """A finished run extended to more steps drops its old final row when it writes past it; its final files
    stay until rewritten. A crash then leaves rows past the newest checkpoint that a resume must accept."""
    _finished_run(tmp_path)
    _checkpoints(tmp_path, 70)
    _rows(tmp_path / "metrics.jsonl", range(74))  # steps 41..73 of the longer run, the final row of 40 gone
    wd.claim(str(tmp_path), {**CONFIG, "train": {"steps": 100, "checkpoint_every": 10}}).release()


def test_a_step_zero_row_is_replaced_only_by_its_own_recomputation(tmp_path):
    """Step 0 has two rows (warm start, initial evaluation): writing the first does not drop the second."""
    path = tmp_path / "metrics.jsonl"
    with open(path, "w") as f:
        f.write(json.dumps({"step": 0, "time": 0.0, "sft": 1.0}) + "\n")
        f.write(json.dumps({"step": 0, "time": 0.0, "eval": 1.0}) + "\n")
        f.write(json.dumps({"step": 1, "time": 0.0, "x": 1.0}) + "\n")
        f.write("5\n")  # a foreign line is skipped, not a traceback
    w = MetricWriter(str(tmp_path), tensorboard=False, enabled=True)
    w.replace_after(-1)
    w.write(0, {"sft": 2.0})
    assert [sorted(set(r) - {"step", "time"}) for r in read_jsonl(path)] == [["sft"], ["eval"], ["x"]]
    assert read_jsonl(path)[0]["sft"] == 2.0 and read_jsonl(path)[1]["eval"] == 1.0
    w.write(0, {"eval": 2.0})
    w.write(1, {"x": 2.0})
    assert [r for r in read_jsonl(path) for r in [{k: v for k, v in r.items() if k != "time"}]] == [
        {"step": 0, "sft": 2.0}, {"step": 0, "eval": 2.0}, {"step": 1, "x": 2.0}]


def test_a_config_json_that_is_not_an_object(tmp_path):
    wd.claim(str(tmp_path), CONFIG).release()
    _rows(tmp_path / "metrics.jsonl", range(3))
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(wd.WorkdirError, match="unreadable config.json \\(not a JSON object\\)"):
        wd.claim(str(tmp_path), CONFIG)
    wd.claim(str(tmp_path), CONFIG, new_run=True).release()
    assert json.loads((tmp_path / "config.json").read_text()) == CONFIG


# ------------------------------------------------------------------ chat models: template and stop ids
def test_chat_prompts_need_a_chat_template():
    tok = build_char_tokenizer()
    tok.chat_template = None
    task = get_task("gym", dataset="basic_arithmetic", test_size=4)
    with pytest.raises(ValueError, match=r"^the run's tokenizer has no chat template, but task 'gym' renders its "
                                         r"prompts as chat messages \(e.g. test example 0\)"):
        check_prompts(_spec(), task, tok, 256, "model.max_len", {"test": task.examples("test", 4)})
    plain = get_task("gym", dataset="basic_arithmetic", test_size=4, template="compact")
    check_prompts(_spec(), plain, tok, 256, "model.max_len", {"test": plain.examples("test", 4)})


def test_stop_ids_come_from_the_generation_config(tmp_path):
    from passk_jax.rl.rollout import checkpoint_stop_ids

    tok = build_char_tokenizer()
    assert checkpoint_stop_ids(tok) == checkpoint_stop_ids(tok, str(tmp_path)) == (tok.eos_token_id,)
    eos = tok.eos_token_id  # the tokenizer's ids come after the generation config's
    for value, expected in [([5, 7, 5], (5, 7, eos)), (3, (3, eos)), (None, (eos,)), ([eos, 4], (eos, 4))]:
        (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": value}))
        assert checkpoint_stop_ids(tok, str(tmp_path)) == expected
    for bad in (["</s>"], 2.0, True):
        (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": bad}))
        with pytest.raises(ValueError, match="generation_config.json: eos_token_id must be a token id or a list"):
            checkpoint_stop_ids(tok, str(tmp_path))
    (tmp_path / "generation_config.json").write_text("{}")
    tok.eos_token = None
    with pytest.raises(ValueError, match=rf"^{tmp_path} \(generation_config.json and tokenizer files\) names no "
                                         "end-of-sequence token"):
        checkpoint_stop_ids(tok, str(tmp_path))


def test_tensorboard_writer_loads_without_torch_and_writes_scalars(tmp_path):
    """``metric_log.summary_writer_class`` imports tensorboardX without torch (a fresh process: torch not yet
    loaded); the event file holds the scalars, and torch still imports afterwards."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import struct, sys
        from passk_jax.run.metric_log import MetricWriter
        w = MetricWriter({str(tmp_path)!r}, enabled=True)
        w.write(3, {{"step/loss": 0.25}})
        w.close()
        assert "torch" not in sys.modules
        import glob, os
        from tensorboardX.proto import event_pb2
        (path,) = glob.glob(os.path.join({str(tmp_path)!r}, "tensorboard", "events.*"))
        data, seen = open(path, "rb").read(), []
        while data:
            (n,) = struct.unpack("<Q", data[:8]); ev = event_pb2.Event.FromString(data[12:12 + n])
            seen += [(ev.step, v.tag, v.simple_value) for v in ev.summary.value]
            data = data[12 + n + 4:]
        assert seen == [(3, "step/loss", 0.25)], seen
        import torch
        print("ok", torch.__version__)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0 and out.stdout.startswith("ok"), out.stderr[-2000:]
