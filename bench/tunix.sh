#!/usr/bin/env bash
# Side by side with Tunix (issue 9; see bench/README.md):  bash bench/tunix.sh [--presets tiny,small] [--repeats N]
# Runs `python -m bench.tunix` from the repository root with the repo's .venv python if present, else python3.
# The first run pip-installs google-tunix (pinned in bench/tunix.py) into its own venv, runs/.venv-tunix
# (needs PyPI once); later runs reuse it. Tunix is never a dependency of passk_jax.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$PY" -m bench.tunix "$@"
