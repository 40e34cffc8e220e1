"""experiments.plan: topology parsing, clear errors, and a real plan of a tiny config on 8 fake devices.

The plan runs in a subprocess because it must set the device count before jax starts. Budget: ~40 s (one
train-step compile of the tiny model; the sampler is only lowered).
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import plan
from tests.conftest import COMPILE_FLAGS

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--config=passk_k4", "--config.rollout.prompts_per_step=4", "--config.rollout.num_samples=4",
        "--config.rollout.max_new_tokens=8", "--config.model.max_len=64"]


def _plan(*args, timeout=120):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["XLA_FLAGS"] = " ".join(COMPILE_FLAGS)  # as the whole suite (tests/conftest.py)
    return subprocess.run([sys.executable, "-m", "experiments.plan", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_parse_topology():
    assert plan.parse_topology("v5p-64") == plan.Topology("v5p-64", 32, 95 * plan.GiB, "TPU v5p", 2.765e12, 6.0e11)
    assert plan.parse_topology("v4-32").devices == 16
    assert plan.parse_topology("v4-32").hbm_bytes == 32 * plan.GiB
    assert plan.parse_topology("v5e-256").devices == 256
    assert plan.parse_topology("v5e-256").hbm_bytes == 16 * plan.GiB
    assert plan.parse_topology("v6e-8").hbm_bytes == 32 * plan.GiB
    assert plan.parse_topology("8xH100") == plan.Topology("8xH100", 8, 80 * plan.GiB, "NVIDIA H100", 3.35e12, 4.5e11)
    assert plan.parse_topology("16xh200").devices == 16
    assert plan.parse_topology("cpu-8").hbm_bytes is None
    for bad in ("v5p-63", "tpu-8", "0xH100", "cpu-0", ""):
        with pytest.raises(ValueError, match="unknown topology .*known topologies are .*v5p-64.*8xH100"):
            plan.parse_topology(bad)


def test_unknown_topology_is_one_clear_error():
    out = _plan("--config=passk_k4", "--topology=v9z-8")
    assert out.returncode != 0
    err = out.stderr.strip().splitlines()
    assert err == [f"error: unknown topology 'v9z-8'; known topologies are {plan.KNOWN_TOPOLOGIES}."]


def test_tiny_plan_on_8_fake_devices():
    out = _plan(*TINY, "--topology=cpu-8", "--mesh=1,4,2", "--only=train", "--top=5")
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    assert "mesh data=1 fsdp=4 tensor=2 (8 fake CPU devices)" in text
    assert "4 prompts x 4 samples = 16 rows x 40 tokens (prompt 32 + completion 8)" in text
    table = {parts[0]: parts[1:] for parts in (re.split(r"\s{2,}", line.strip()) for line in text.splitlines())}
    args_sharded, args_xla = float(table["arguments (from shardings)"][0]), float(table["arguments (XLA)"][0])
    assert args_xla == pytest.approx(args_sharded, rel=0.05)  # XLA's numbers are per device, like ours
    assert float(table["temporaries"][0]) > 0
    assert float(table["peak estimate (arg+out-alias+temp+code)"][0]) >= args_xla
    # largest arrays: 5 rows with their sharding; the MLP weights are split over fsdp and tensor
    rows = text.split("largest arrays")[1].splitlines()[2:7]
    assert len(rows) == 5
    assert any("layers.gate_proj" in r and "P(None, 'fsdp', 'tensor')" in r for r in rows)
    assert "total per device: params" in text


def test_mesh_that_does_not_divide_the_devices():
    out = _plan(*TINY, "--topology=cpu-8", "--mesh=3,1,1", "--lower_only")
    assert out.returncode != 0
    assert out.stderr.strip().splitlines()[-1] == (
        "error: mesh data=3 x fsdp=1 x tensor=1 does not divide the 8 devices of cpu-8.")


def test_sampler_programs_and_decode_step_report():
    out = _plan(*TINY, "--topology=cpu-8", "--mesh=2,4,1", "--only=sample", "--top=1", "--config.rollout.decode_slots=0")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "prefill: compiled" in out.stdout and "decode: compiled" in out.stdout
    assert "decode 16 rows x 8 new tokens" in out.stdout
    assert "arguments (from shardings)" in out.stdout
    assert "decode layout: 'replicated' ('auto' requested)" in out.stdout
    # replicated decode weights: nothing but the loop's done flag crosses devices per generated token
    line = next(x for x in out.stdout.splitlines() if "collectives per step, per device" in x)
    assert line.split()[5] == "0.000" and "all-gather" not in line, line
    assert "HBM read per step (weights + KV slots)" in out.stdout


def test_lora_plan_holds_the_adapters_optimiser_state_only():
    """A LoRA plan (lowered only: fast): the optimiser state covers the adapters only (Adam's two moments of
    the rank-4 adapters; full fine-tuning's would be twice the parameters)."""
    out = _plan(*TINY, "--config.sft.steps=0", "--config.model.lora_rank=4", "--topology=cpu-8", "--mesh=1,4,2",
                "--only=train", "--lower_only")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "trains LoRA rank 4 on q,k,v,o,gate,up,down" in out.stdout
    params, opt = (float(x) for x in re.search(r"total per device: params ([\d.]+) \w+, optimizer state ([\d.]+)",
                                               out.stdout).groups())
    assert 0 < opt < 0.5 * params
