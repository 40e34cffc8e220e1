#!/usr/bin/env bash
# Start N cooperating JAX processes on this machine (CPU devices, loopback coordinator).
# See launch/README.md.
set -euo pipefail

PROG=local_multiprocess.sh

usage() {
  cat <<'EOF'
usage: local_multiprocess.sh N [options] -- COMMAND [ARGS...]

Start N copies of COMMAND on this machine as one multi-process JAX job on CPU devices,
with the coordinator on 127.0.0.1:PORT (loopback only). Each process gets the environment
  JAX_PLATFORMS=cpu PYTHONUNBUFFERED=1
  PASSK_COORDINATOR=127.0.0.1:PORT PASSK_NUM_PROCESSES=N PASSK_PROCESS_ID=I
and, when COMMAND is `python -m experiments.<module> ...`, also the flags
  --coordinator_address=127.0.0.1:PORT --num_processes=N --process_id=I
Output lines are prefixed with [pI]; stdin is /dev/null. The script waits for all processes;
when one fails the others are stopped (SIGTERM, then SIGKILL after 10 s) and the script exits
with the failed process's code.

options:
  --port P                  coordinator port on 127.0.0.1 (default: $PASSK_PORT or 12355)
  --devices-per-process D   CPU devices per process
                            (sets XLA_FLAGS=--xla_force_host_platform_device_count=D)
  --dry-run                 print the N command lines and run nothing
  -h, --help                show this help

example:
  launch/local_multiprocess.sh 2 --devices-per-process 2 -- \
      .venv/bin/python -m experiments.run --config=tiny --workdir=/tmp/run
EOF
}

die() {
  printf '%s: error: %s\n' "$PROG" "$1" >&2
  printf "Run '%s --help' for usage.\n" "$PROG" >&2
  exit 2
}

# Print the arguments as one shell-quoted command line (copy-pastable, deterministic).
quote_line() {
  local out=() a
  for a in "$@"; do
    if [[ $a =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
      out+=("$a")
    else
      out+=("'${a//\'/\'\\\'\'}'")
    fi
  done
  local IFS=' '
  printf '%s\n' "${out[*]}"
}

is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }

num=""
port="${PASSK_PORT:-12355}"
devices=""
dry_run=0
while (($#)); do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --dry-run) dry_run=1; shift ;;
    --port) (($# >= 2)) || die "--port needs a value"; port=$2; shift 2 ;;
    --port=*) port=${1#*=}; shift ;;
    --devices-per-process) (($# >= 2)) || die "--devices-per-process needs a value"; devices=$2; shift 2 ;;
    --devices-per-process=*) devices=${1#*=}; shift ;;
    --) shift; break ;;
    -*) die "unknown option '$1' (the command goes after '--')" ;;
    *)
      [[ -z $num ]] || die "unexpected argument '$1' (the command goes after '--')"
      num=$1; shift ;;
  esac
done
cmd=("$@")

[[ -n $num ]] || die "missing N, the number of processes"
if ! is_uint "$num" || ((10#$num < 1)); then die "N must be a positive integer, got '$num'"; fi
num=$((10#$num))
if ! is_uint "$port" || ((10#$port < 1 || 10#$port > 65535)); then
  die "--port must be in 1..65535, got '$port'"
fi
port=$((10#$port))
if [[ -n $devices ]]; then
  if ! is_uint "$devices" || ((10#$devices < 1)); then
    die "--devices-per-process must be a positive integer, got '$devices'"
  fi
  devices=$((10#$devices))
fi
((${#cmd[@]})) || die "missing command after '--'"

coordinator="127.0.0.1:${port}"

# Flags are appended only to `python... -m experiments.<module>` commands.
append_flags=0
if [[ $(basename -- "${cmd[0]}") =~ ^python[0-9.]*$ ]]; then
  for ((j = 1; j + 1 < ${#cmd[@]}; j++)); do
    if [[ ${cmd[j]} == -m && ${cmd[j + 1]} == experiments.* ]]; then
      append_flags=1
      break
    fi
  done
fi

xla_flags=""
if [[ -n $devices ]]; then
  # Replace any inherited device-count flag with ours.
  read -r -a inherited <<<"${XLA_FLAGS:-}"
  kept=()
  for f in ${inherited[@]+"${inherited[@]}"}; do
    [[ $f == --xla_force_host_platform_device_count=* ]] || kept+=("$f")
  done
  kept+=("--xla_force_host_platform_device_count=${devices}")
  xla_flags="${kept[*]}"
fi

# Build the full command line of process $1 into the array `line`.
build_line() {
  local i=$1
  line=(env JAX_PLATFORMS=cpu PYTHONUNBUFFERED=1
    "PASSK_COORDINATOR=${coordinator}" "PASSK_NUM_PROCESSES=${num}" "PASSK_PROCESS_ID=${i}")
  [[ -z $xla_flags ]] || line+=("XLA_FLAGS=${xla_flags}")
  line+=("${cmd[@]}")
  if ((append_flags)); then
    line+=("--coordinator_address=${coordinator}" "--num_processes=${num}" "--process_id=${i}")
  fi
}

if ((dry_run)); then
  for ((i = 0; i < num; i++)); do
    build_line "$i"
    quote_line "${line[@]}"
  done
  exit 0
fi

prefix_lines() {
  local tag=$1 l
  while IFS= read -r l || [[ -n $l ]]; do
    printf '%s %s\n' "$tag" "$l"
  done
}

# Each process runs in its own process group (job control), so it can be stopped as a whole.
set -m
pids=()
alive=()

stop_all() {
  local k t
  for k in "${!pids[@]}"; do
    ((alive[k])) && kill -TERM -- "-${pids[k]}" 2>/dev/null || true
  done
  for ((t = 0; t < 100; t++)); do
    local any=0
    for k in "${!pids[@]}"; do
      ((alive[k])) && kill -0 -- "-${pids[k]}" 2>/dev/null && any=1
    done
    ((any)) || return 0
    sleep 0.1
  done
  for k in "${!pids[@]}"; do
    ((alive[k])) && kill -KILL -- "-${pids[k]}" 2>/dev/null || true
  done
}

# shellcheck disable=SC2329  # invoked by the traps below
on_signal() {
  printf '%s: received %s, stopping all processes\n' "$PROG" "$1" >&2
  trap - INT TERM
  stop_all
  wait || true
  exit "$2"
}
trap 'on_signal SIGINT 130' INT
trap 'on_signal SIGTERM 143' TERM

for ((i = 0; i < num; i++)); do
  build_line "$i"
  (
    set +e +m
    "${line[@]}" </dev/null 2>&1 | prefix_lines "[p${i}]"
    rc=${PIPESTATUS[0]}
    ((rc == 0)) || printf '[p%d] exited with code %d\n' "$i" "$rc" >&2
    exit "$rc"
  ) &
  pids[i]=$!
  alive[i]=1
done
set +m # groups are set; no job-status chatter from here on

status=0
for ((n = 0; n < num; n++)); do
  rc=0
  wait -n || rc=$?
  # Mark finished processes (wait -n does not say which one).
  for k in "${!pids[@]}"; do
    ((alive[k])) && ! kill -0 -- "-${pids[k]}" 2>/dev/null && alive[k]=0
  done
  if ((rc != 0)); then
    status=$rc
    printf '%s: a process failed (exit code %d), stopping the others\n' "$PROG" "$rc" >&2
    stop_all
    wait || true
    break
  fi
done
exit "$status"
