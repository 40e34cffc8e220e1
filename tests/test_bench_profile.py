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
    env = dict(os.environ, JAX_PLATFORMS="cpu",  # one device; -O0 as the whole suite (tests/conftest.py)
               XLA_FLAGS="--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0")
    cmd = [sys.executable, "-m", "bench.profile_run", "--config=passk_k4", f"--workdir={tmp_path / 'run'}",
           "--config.train.steps=2", "--config.sft.steps=2", "--config.sft.num_examples=8",
           "--config.sft.batch_size=4", "--config.rollout.prompts_per_step=4", "--config.rollout.num_samples=4", "--config.rollout.decode_slots=8",
           "--config.rollout.max_new_tokens=12", "--config.eval.num_prompts=4", "--config.eval.num_samples=2",
           "--config.train.checkpoint_every=1", "--config.train.export_hf=false", "--config.step.k=2"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {m.group(1): (float(m.group(2)), int(m.group(3)))
            for m in re.finditer(r"^\| ([^|]+?) \| ([0-9.-]+) \| [0-9.]+% \| (\d+) \|", out.stdout, re.M)}
    assert set(rows) == set(profile_run.ORDER), out.stdout
    wall = float(re.search(r"wall ([0-9.]+) s, 2 RL steps", out.stdout).group(1))
    assert abs(sum(t for t, _ in rows.values()) - wall) < 0.05 * wall
    assert rows["update"][1] == 2 and rows["prefill"][1] == 2 and rows["decode"][1] == 2
    assert rows["warm start (SFT)"][1] == 1 and rows["eval"][1] == 2 and rows["score"][1] == 2
