"""`bash bench/gpu.sh --cpu-smoke` runs every phase of the accelerator benchmark on the CPU and prints the table
last (the GPU script's code paths, a tiny model and batch)."""
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_bench_cpu_smoke(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    out = tmp_path / "gpu.json"
    proc = subprocess.run(["bash", "bench/gpu.sh", "--cpu-smoke", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.rstrip().splitlines()
    header_at = max(i for i, line in enumerate(lines) if line.startswith("passk_jax bench.gpu |"))
    table = lines[header_at:]
    assert table[1].split()[:3] == ["model", "phase", "status"]
    rows = [line.split() for line in table[2:]]
    assert [r[:3] for r in rows] == [["tiny", p, "ok"] for p in ("sampler", "train_step", "rl_step")], table
    for r in rows:
        assert float(r[3].replace(",", "")) > 0  # tokens/s
    assert out.exists() and '"rows"' in out.read_text()
