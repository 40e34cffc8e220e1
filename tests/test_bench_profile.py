"""bench.profile_run: the phase table of a tiny run adds up and names every phase."""
import os
import re
import subprocess
import sys

from bench import profile_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_profiler_charges_nested_time_to_the_innermost_phase():
    prof = profile_run.Profiler()
    with prof.phase("update"):
        with prof.phase("score"):
            pass
    with prof.phase("eval"):
        with prof.phase("score"):  # absorbed by eval
            pass
    assert prof.calls["update"] == 1 and prof.calls["score"] == 1 and prof.calls["eval"] == 1
    text = profile_run.table(prof, wall=1.0, rl_steps=1)
    assert all(f"| {name} |" in text for name in profile_run.ORDER)


def test_profile_of_a_tiny_run(tmp_path):
    """In process, on the tests' tiny config (the programs the trainer tests compile): the phases add up to
    the wall time and each is called as often as the run does it."""
    from tests.rl.test_trainer import tiny_config

    config = tiny_config(tmp_path / "unused", **{"train.steps": 2, "train.eval_every": 0, "train.export_hf": False})
    summary, prof, wall = profile_run.profile(config, str(tmp_path / "run"))
    assert summary["status"] == "done" and not os.path.exists(str(tmp_path / "unused"))  # a fresh SFT cache
    out = profile_run.table(prof, wall, int(summary["step"]))
    rows = {m.group(1): (float(m.group(2)), int(m.group(3)))
            for m in re.finditer(r"^\| ([^|]+?) \| ([0-9.-]+) \| [0-9.]+% \| (\d+) \|", out, re.M)}
    assert set(rows) == set(profile_run.ORDER), out
    assert re.search(r"wall [0-9.]+ s, 2 RL steps", out)
    assert abs(sum(t for t, _ in rows.values()) - wall) < 0.05 * wall
    assert rows["update"][1] == 2 and rows["prefill"][1] == 2 and rows["decode"][1] == 2
    assert rows["warm start (SFT)"][1] == 1 and rows["eval"][1] == 2 and rows["score"][1] == 2


def test_profile_command_line_errors_are_one_sentence():
    """The command itself (absl flags -> config -> profile): a bad override is one sentence, before any run."""
    out = subprocess.run([sys.executable, "-m", "bench.profile_run", "--config=passk_k4", "--config.train.stepz=2"],
                         cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode != 0 and "stepz" in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]
    helped = subprocess.run([sys.executable, "-m", "bench.profile_run", "--helpfull"], cwd=ROOT,
                            env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True, timeout=300)
    assert "--workdir" in helped.stdout and "--[no]keep_sft" in helped.stdout, helped.stdout[-2000:]
