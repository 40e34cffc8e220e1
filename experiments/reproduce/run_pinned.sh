#!/usr/bin/env bash
# Run (or continue) a study design on the code of one commit, whatever the checkout holds now:
#
#   bash experiments/reproduce/run_pinned.sh DESIGN COMMIT [--commit-records]
#
# A git worktree of COMMIT (../study-<design>-<commit>) runs `python -m experiments.reproduce --study
# --design DESIGN` with this checkout's .venv, writing records into this checkout's
# experiments/reproduce/results/study/<design>/ and runs into runs/reproduce/ (resumed from their checkpoints
# when interrupted). Edits to the checkout while it runs cannot reach the study. With --commit-records,
# each new record is committed (that path only) as it lands. Stop it with SIGTERM (kill the printed pid): the
# running run checkpoints and the next call resumes it.
set -euo pipefail
design=${1:?usage: run_pinned.sh DESIGN COMMIT [--commit-records]}
commit=${2:?usage: run_pinned.sh DESIGN COMMIT [--commit-records]}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
tree="$(dirname "$root")/study-${design}-${commit:0:7}"
py="$root/.venv/bin/python"
[[ -x "$py" ]] || { echo "no $py: run 'make install' first" >&2; exit 1; }
git -C "$root" cat-file -e "${commit}^{commit}" 2>/dev/null || { echo "unknown commit $commit" >&2; exit 1; }
if [[ ! -d "$tree" ]]; then git -C "$root" worktree add -q --detach "$tree" "$commit"; fi
mkdir -p "$root/runs/logs"
log="$root/runs/logs/study-$design.log"
(cd "$tree" && PYTHONPATH="$tree" nohup "$py" -m experiments.reproduce --study --design "$design" \
   --out "$root/experiments/reproduce/results" --runs "$root/runs/reproduce" >>"$log" 2>&1) &
pid=$!
echo "study $design at ${commit:0:7}: pid $pid, log $log"
if [[ "${3:-}" == "--commit-records" ]]; then
  records="experiments/reproduce/results/study/$design"
  (while kill -0 "$pid" 2>/dev/null; do
     sleep 60
     cd "$root"
     if [[ -n "$(git status --porcelain -- "$records")" ]]; then
       git add -- "$records" && git commit -q -m "Study $design: $(find "$records" -name 'seed*.json' -not -path '*/superseded/*' | wc -l) run records" -- "$records" || true
     fi
   done) >/dev/null 2>&1 &
fi
