#!/usr/bin/env bash
# One-command accelerator benchmark (see bench/README.md):  bash bench/gpu.sh [--cpu-smoke] [--out FILE]
# Runs `python -m bench.gpu` from the repository root with the repo's .venv python if present, else python3:
# sampler / train step / RL step of Qwen2.5-1.5B and -0.5B shapes plus the variants (decode layout, KV dtype,
# training attention kernel, XLA command buffers off via XLA_FLAGS in a child, continuous batching vs lockstep
# on a long-tailed workload), one table, <= 8 minutes.
# No network access is needed: random weights, synthetic prompts and rewards.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
for a in "$@"; do
  if [[ "$a" == "--cpu-smoke" ]]; then export JAX_PLATFORMS=cpu; fi
done
exec "$PY" -m bench.gpu "$@"
