"""`bash bench/gpu.sh --cpu-smoke` runs every phase and every variant of the accelerator benchmark on the CPU
and prints the table last (the GPU script's code paths, a tiny model and batch; cuDNN attention is skipped
with its reason)."""
import json
import os
import subprocess
from pathlib import Path
from tests.conftest import COMPILE_FLAGS

ROOT = Path(__file__).resolve().parents[1]

# (phase, variant, status) in table order
EXPECTED = [("sampler", "default", "ok"), ("sampler", "layout=training", "ok"), ("sampler", "kv=f32", "ok"),
            ("sampler", "cmdbuf=off", "ok"), ("sampler", "slots=lockstep", "ok"), ("sampler", "slots=16", "ok"),
            ("train_step", "default", "ok"), ("train_step", "cmdbuf=off", "ok"),
            ("train_step", "attn=cudnn", "skipped"), ("train_step", "attn=blocked", "ok"),
            ("train_step", "attn=plain", "ok"), ("rl_step", "default", "ok")]


def test_gpu_bench_cpu_smoke(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["XLA_FLAGS"] = " ".join(COMPILE_FLAGS)  # as the whole suite (tests/conftest.py)
    out = tmp_path / "gpu.json"
    proc = subprocess.run(["bash", "bench/gpu.sh", "--cpu-smoke", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.rstrip().splitlines()
    header_at = max(i for i, line in enumerate(lines) if line.startswith("passk_jax bench.gpu |"))
    table = lines[header_at:]
    assert table[1].split()[:8] == ["model", "phase", "variant", "status", "tokens/s", "util", "target", "met"]
    rows = [line.split() for line in table[2:]]
    assert [tuple(r[1:4]) for r in rows] == EXPECTED, "\n".join(table)
    assert all(r[0] == "tiny" for r in rows)
    for r, line in zip(rows, table[2:]):
        if r[3] == "ok":
            assert float(r[4].replace(",", "")) > 0  # tokens/s
            assert "not measured" not in line
        else:  # never an estimate for a row that did not run
            assert r[4] == "-" and "not measured" in line, line
    assert "needs a GPU" in table[2 + EXPECTED.index(("train_step", "attn=cudnn", "skipped"))]

    data = json.loads(out.read_text())
    by = {(r["phase"], r["variant"]): r for r in data["rows"]}
    assert by[("sampler", "default")]["layout"] == "replicated"
    assert by[("sampler", "default")]["weight_dtype"] == "bfloat16"
    assert by[("sampler", "layout=training")]["layout"] == "training"
    assert by[("sampler", "layout=training")]["weight_dtype"] == "float32"
    assert by[("sampler", "default")]["kv_dtype"] == "bfloat16"
    assert by[("sampler", "kv=f32")]["kv_dtype"] == "float32"
    assert (by[("sampler", "kv=f32")]["bytes_per_step_gb"] > by[("sampler", "default")]["bytes_per_step_gb"])
    for p in ("sampler", "train_step"):
        assert "--xla_gpu_enable_command_buffer=" in by[(p, "cmdbuf=off")]["xla_flags"]
        assert "command_buffer" not in by[(p, "default")]["xla_flags"]
    assert by[("train_step", "attn=plain")]["attention"] == "plain"
    assert by[("train_step", "attn=blocked")]["attention"] == "blocked"
    assert by[("train_step", "attn=plain")]["seq"] > by[("train_step", "default")]["seq"]
    # continuous batching vs lockstep: same tokens, slot utilisation in the util column, no target
    lock, slots = by[("sampler", "slots=lockstep")], by[("sampler", "slots=16")]
    assert slots["tokens_identical"] is True and slots["speedup"] > 0
    assert lock["slots"] == 0 and slots["slots"] == 16 and lock["vocab"] == slots["vocab"] == 512
    assert lock["rows"] == slots["rows"] == 64 and lock["new_tokens"] == 64
    assert lock["useful_tokens"] == slots["useful_tokens"] and lock["decode_steps"] == lock["len_max"]
    assert lock["in_flight"] == 64 and slots["in_flight"] == 16
    for r in (lock, slots):
        assert 0 < r["util"] <= 1
        line = table[2 + EXPECTED.index(("sampler", r["variant"], "ok"))]
        assert line.split()[5:9] == ["slots", f"{100 * r['util']:.1f}%", "-", "-"], line
    assert "tokens identical" in table[2 + EXPECTED.index(("sampler", "slots=16", "ok"))]
