#!/usr/bin/env bash
# Create, set up, run on and delete a Cloud TPU VM slice (plain multi-controller JAX, no Pathways).
# See launch/README.md.
set -euo pipefail

PROG=tpu_pod.sh
REPO_ROOT=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)

usage() {
  cat <<'EOF'
usage: tpu_pod.sh COMMAND [options] [-- EXTRA_RUN_ARGS...]

commands:
  create   create the TPU VM (or queued resource) and wait until it is ready
  setup    sync the code to all workers and install the package in a venv there
  run      setup, then run `python -m experiments.run` on --worker=all, streaming the logs;
           after a preemption the slice is recreated, set up again and the run relaunched
           (it resumes from the checkpoints in --workdir)
  status   show the TPU VM (and queued resource)
  delete   delete the TPU VM (or the queued resource together with its VM)

options (environment variable in brackets):
  --name NAME               TPU VM name, also the queued-resource id   [PASSK_TPU_NAME]
  --zone ZONE               e.g. us-central2-b                          [PASSK_TPU_ZONE]
  --project PROJECT         GCP project (default: gcloud's)             [PASSK_TPU_PROJECT]
  --accelerator-type TYPE   e.g. v4-32, v5p-64, v5litepod-16, v6e-16    [PASSK_TPU_TYPE]
  --runtime-version V       TPU software version (default from TYPE:    [PASSK_TPU_RUNTIME]
                            v6e v2-alpha-tpuv6e, v5p v2-alpha-tpuv5,
                            v5litepod v2-alpha-tpuv5-lite, v4/v3/v2 tpu-ubuntu2204-base)
  --spot                    Spot VMs (preemptible, cheaper)
  --best-effort             best-effort queued resource (implies --queued; gcloud alpha)
  --queued                  create through a queued resource instead of `tpu-vm create`
  --create-arg ARG          extra argument for the gcloud create command (repeatable)
  --config NAME             experiments config (run)                    [PASSK_CONFIG]
  --workdir DIR             run directory; use gs://BUCKET/PATH so a    [PASSK_WORKDIR]
                            recreated slice resumes from its checkpoints
  --code-dir DIR            local code to sync (default: this checkout)
  --git-repo URL            clone URL on the workers instead of syncing --code-dir
  --git-ref REF             branch, tag or commit to check out with --git-repo (default: main)
  --remote-dir DIR          code directory on the workers, under ~ (default: passk_jax)
  --venv DIR                virtual environment on the workers, under ~ (default: passk_venv)
  --python-version V        Python of that venv, installed by uv (default: 3.11)
  --jax-spec SPEC           JAX requirement installed next to the package (default: jax[tpu]);
                            versions are pinned by the repository's constraints.txt
  --max-restarts N          relaunches after preemption or lost connection (default: 100)
  --poll-seconds S          wait between state checks while provisioning (default: 60)
  --dry-run                 print the commands, one per line, and execute nothing
  -h, --help                show this help
Arguments after `--` are appended to the experiments.run command line.

examples:
  launch/tpu_pod.sh create --name=pk --zone=us-central2-b --accelerator-type=v4-32 --spot
  launch/tpu_pod.sh run --name=pk --zone=us-central2-b --accelerator-type=v4-32 --spot \
      --config=passk_k4 --workdir=gs://my-bucket/runs/passk_k4 -- --config.seed=1
  launch/tpu_pod.sh delete --name=pk --zone=us-central2-b
EOF
}

die() {
  printf '%s: error: %s\n' "$PROG" "$1" >&2
  printf "Run '%s --help' for usage.\n" "$PROG" >&2
  exit 2
}

log() { printf '%s: %s\n' "$PROG" "$*" >&2; }

# Quote one argument for a POSIX shell (unchanged when it is plainly safe; `--opt=value` keeps
# the option name outside the quotes).
quote_arg() {
  if [[ $1 =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$1"
  elif [[ $1 =~ ^(--[A-Za-z0-9_.-]+=)(.*)$ ]]; then
    printf "%s'%s'" "${BASH_REMATCH[1]}" "${BASH_REMATCH[2]//\'/\'\\\'\'}"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# Quote one word of a command run by the workers' shell: double quotes when they suffice, so the
# whole remote command reads cleanly inside the single quotes of the local command line.
remote_arg() {
  if [[ $1 =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$1"
  elif [[ $1 != *[\"\$\`\\!]* ]]; then
    printf '"%s"' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# Print the arguments as one shell-quoted command line.
quote_line() {
  local out=() a
  for a in "$@"; do out+=("$(quote_arg "$a")"); done
  local IFS=' '
  printf '%s\n' "${out[*]}"
}

dry_run=0
# Run a command, or print it under --dry-run.
run() {
  if ((dry_run)); then
    quote_line "$@"
  else
    "$@"
  fi
}

note() { if ((dry_run)); then printf '# %s\n' "$*"; fi; }

# ---------------------------------------------------------------------------------------- options
(($#)) || { usage >&2; exit 2; }
case $1 in
  -h | --help) usage; exit 0 ;;
  create | setup | run | status | delete) command=$1; shift ;;
  *) die "unknown command '$1' (expected create, setup, run, status or delete)" ;;
esac

name=${PASSK_TPU_NAME:-}
zone=${PASSK_TPU_ZONE:-}
project=${PASSK_TPU_PROJECT:-}
accel=${PASSK_TPU_TYPE:-}
runtime=${PASSK_TPU_RUNTIME:-}
config=${PASSK_CONFIG:-}
workdir=${PASSK_WORKDIR:-}
spot=0
best_effort=0
queued=0
create_args=()
code_dir=$REPO_ROOT
git_repo=""
git_ref=main
remote_dir=passk_jax
venv=passk_venv
python_version=3.11
jax_spec='jax[tpu]'
max_restarts=100
poll_seconds=60
extra=()

# Value of an option given as `--opt VALUE` or `--opt=VALUE`; sets `val` and `nshift`.
take() {
  if [[ $1 == *=* ]]; then
    val=${1#*=}
    nshift=1
  else
    (($# >= 2)) || die "$1 needs a value"
    val=$2
    nshift=2
  fi
}

while (($#)); do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --dry-run) dry_run=1; shift; continue ;;
    --spot) spot=1; shift; continue ;;
    --best-effort) best_effort=1; queued=1; shift; continue ;;
    --queued) queued=1; shift; continue ;;
    --) shift; extra=("$@"); break ;;
  esac
  opt=${1%%=*}
  case $opt in
    --name | --zone | --project | --accelerator-type | --runtime-version | --create-arg | --config | \
      --workdir | --code-dir | --git-repo | --git-ref | --remote-dir | --venv | --python-version | \
      --jax-spec | --max-restarts | --poll-seconds) take "$@" ;;
    *) die "unknown option '$1'" ;;
  esac
  case $opt in
    --name) name=$val ;;
    --zone) zone=$val ;;
    --project) project=$val ;;
    --accelerator-type) accel=$val ;;
    --runtime-version) runtime=$val ;;
    --create-arg) create_args+=("$val") ;;
    --config) config=$val ;;
    --workdir) workdir=$val ;;
    --code-dir) code_dir=$val ;;
    --git-repo) git_repo=$val ;;
    --git-ref) git_ref=$val ;;
    --remote-dir) remote_dir=$val ;;
    --venv) venv=$val ;;
    --python-version) python_version=$val ;;
    --jax-spec) jax_spec=$val ;;
    --max-restarts) max_restarts=$val ;;
    --poll-seconds) poll_seconds=$val ;;
  esac
  shift "$nshift"
done

[[ -n $name ]] || die "missing --name (or PASSK_TPU_NAME)"
[[ -n $zone ]] || die "missing --zone (or PASSK_TPU_ZONE)"
if ((spot && best_effort)); then die "--spot and --best-effort exclude each other"; fi
[[ $max_restarts =~ ^[0-9]+$ ]] || die "--max-restarts must be a non-negative integer, got '$max_restarts'"
[[ $poll_seconds =~ ^[0-9]+$ ]] || die "--poll-seconds must be a non-negative integer, got '$poll_seconds'"
for d in "$remote_dir" "$venv"; do
  [[ $d =~ ^[A-Za-z0-9_.-][A-Za-z0-9_./-]*$ ]] || die "--remote-dir/--venv must be a plain path under ~, got '$d'"
done

needs_create=0
needs_setup=0
case $command in
  create) needs_create=1 ;;
  setup) needs_setup=1 ;;
  run) needs_create=1; needs_setup=1 ;;
esac
if ((needs_create)); then
  [[ -n $accel ]] || die "missing --accelerator-type (or PASSK_TPU_TYPE), e.g. v5p-64"
  if [[ -z $runtime ]]; then
    case $accel in
      v6e-*) runtime=v2-alpha-tpuv6e ;;
      v5p-*) runtime=v2-alpha-tpuv5 ;;
      v5litepod-* | v5e-*) runtime=v2-alpha-tpuv5-lite ;;
      v4-* | v3-* | v2-*) runtime=tpu-ubuntu2204-base ;;
      *) die "no default --runtime-version for accelerator type '$accel'; pass one" ;;
    esac
  fi
fi
if ((needs_setup)) && [[ -z $git_repo ]]; then
  [[ -d $code_dir ]] || die "--code-dir '$code_dir' is not a directory"
fi
if [[ $command == run ]]; then
  [[ -n $config ]] || die "missing --config (or PASSK_CONFIG)"
  [[ -n $workdir ]] || die "missing --workdir (or PASSK_WORKDIR)"
  if [[ $workdir != gs://* ]]; then
    log "warning: --workdir '$workdir' is not on GCS: every worker needs the same checkpoint" \
      "directory, and a recreated slice starts with empty disks"
  fi
fi

# ------------------------------------------------------------------------------- gcloud commands
loc=("--zone=${zone}")
[[ -z $project ]] || loc+=("--project=${project}")

create_cmd() {
  local g=(gcloud)
  if ((queued)); then
    if ((best_effort)); then g+=(alpha); fi
    g+=(compute tpus queued-resources create "$name" "--node-id=${name}" "${loc[@]}"
      "--accelerator-type=${accel}" "--runtime-version=${runtime}")
    if ((best_effort)); then g+=(--best-effort); fi
  else
    g+=(compute tpus tpu-vm create "$name" "${loc[@]}" "--accelerator-type=${accel}" "--version=${runtime}")
  fi
  if ((spot)); then g+=(--spot); fi
  run "${g[@]}" ${create_args[@]+"${create_args[@]}"}
}

delete_cmd() {
  if ((queued)); then
    run gcloud compute tpus queued-resources delete "$name" "${loc[@]}" --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$name" "${loc[@]}" --quiet
  fi
}

state_cmd() {
  if ((queued)); then
    run gcloud compute tpus queued-resources describe "$name" "${loc[@]}" '--format=value(state.state)'
  else
    run gcloud compute tpus tpu-vm describe "$name" "${loc[@]}" '--format=value(state)'
  fi
}

# Current state (READY/ACTIVE, CREATING, PREEMPTED, SUSPENDED, ...), NOT_FOUND, or UNKNOWN when
# gcloud fails for another reason.
get_state() {
  local s err errf rc=0
  errf=$(mktemp)
  s=$(state_cmd 2>"$errf") || rc=$?
  err=$(<"$errf")
  rm -f "$errf"
  s=${s//[[:space:]]/}
  if ((rc == 0)); then
    printf '%s\n' "${s:-UNKNOWN}"
  elif [[ $err == *NOT_FOUND* || $err == *"not found"* ]]; then
    printf 'NOT_FOUND\n'
  else
    log "cannot read the state of $name: $err"
    printf 'UNKNOWN\n'
  fi
}

is_ready() { [[ $1 == READY || $1 == ACTIVE ]]; }

is_pending() {
  case $1 in
    CREATING | STARTING | RESTARTING | REPAIRING | ACCEPTED | PROVISIONING | \
      WAITING_FOR_RESOURCES | CREATING_NODES) return 0 ;;
    *) return 1 ;;
  esac
}

ssh_all() { run gcloud compute tpus tpu-vm ssh "$name" "${loc[@]}" --worker=all "--command=$1"; }

tarball="${TMPDIR:-/tmp}/passk_jax_code_${name}.tar.gz"

# Functions below return the first failing command's status explicitly: the relaunch loop calls
# them where `set -e` does not apply.
sync_code() {
  # shellcheck disable=SC2088  # ~ expands on the workers
  local rd="~/${remote_dir}"
  if [[ -n $git_repo ]]; then
    ssh_all "(test -d ${rd}/.git || git clone --quiet $(remote_arg "$git_repo") ${rd})\
 && git -C ${rd} fetch --quiet origin $(remote_arg "$git_ref")\
 && git -C ${rd} checkout --quiet --force FETCH_HEAD"
  else
    run tar -czf "$tarball" --exclude=.git --exclude=.venv --exclude=.work --exclude=runs \
      --exclude=__pycache__ '--exclude=*.egg-info' -C "$code_dir" . || return
    run gcloud compute tpus tpu-vm scp "$tarball" "${name}:passk_jax_code.tar.gz" "${loc[@]}" \
      --worker=all || return
    run rm -f "$tarball" || return
    ssh_all "mkdir -p ${rd} && tar -xzf ~/passk_jax_code.tar.gz -C ${rd} && rm -f ~/passk_jax_code.tar.gz"
  fi
}

install_package() {
  # shellcheck disable=SC2088  # ~ expands on the workers
  local rd="~/${remote_dir}" vd="~/${venv}"
  ssh_all "(python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install --user --quiet uv)\
 && (test -x ${vd}/bin/python || python3 -m uv venv --quiet --python $(remote_arg "$python_version") ${vd})\
 && python3 -m uv pip install --quiet --python ${vd}/bin/python -c ${rd}/constraints.txt\
 $(remote_arg "$jax_spec") -e ${rd}"
}

setup() {
  sync_code || return
  install_package
}

# The training command on every worker. A process left over from an earlier launch (lost ssh
# connection) is stopped first; its pid is kept in ~/passk_run.pid.
launch() {
  # shellcheck disable=SC2088  # ~ expands on the workers
  local rd="~/${remote_dir}" vd="~/${venv}" a
  local line="exec env PYTHONUNBUFFERED=1 ${vd}/bin/python -m experiments.run"
  for a in "--config=${config}" "--workdir=${workdir}" ${extra[@]+"${extra[@]}"}; do
    line+=" $(remote_arg "$a")"
  done
  # shellcheck disable=SC2016  # $pid and $$ expand on the workers
  ssh_all 'pid=$(cat ~/passk_run.pid 2>/dev/null || true);'\
' if [ -n "$pid" ] && ps -o args= -p "$pid" | grep -q experiments.run; then kill "$pid"; sleep 10; fi;'\
" cd ${rd} && echo \$\$ > ~/passk_run.pid && ${line}"
}

failures=0
# Count one failed attempt (create, setup or run); give up past --max-restarts.
count_failure() {
  failures=$((failures + 1))
  if ((failures > max_restarts)); then
    log "giving up after ${max_restarts} relaunches: $1"
    exit 1
  fi
  log "$1; retry ${failures} of ${max_restarts} in ${poll_seconds}s"
  sleep "$poll_seconds"
}

# Block until the slice is usable; create (or recreate) it when missing or preempted.
# Sets recreated=1 when it had to create it.
ensure_ready() {
  local state
  recreated=0
  while :; do
    state=$(get_state)
    if is_ready "$state"; then
      return 0
    elif is_pending "$state"; then
      log "$name is $state; checking again in ${poll_seconds}s"
      sleep "$poll_seconds"
      continue
    elif [[ $state == UNKNOWN ]]; then
      count_failure "the state of $name is unknown"
      continue
    elif [[ $state != NOT_FOUND ]]; then
      log "$name is $state; deleting and recreating it"
      delete_cmd || true
    fi
    log "creating $name"
    recreated=1
    create_cmd || count_failure "creating $name failed"
  done
}

wait_ready() {
  local state
  while :; do
    state=$(get_state)
    if is_ready "$state"; then return 0; fi
    if ! is_pending "$state"; then
      log "$name is $state, not becoming ready"
      return 1
    fi
    log "$name is $state; checking again in ${poll_seconds}s"
    sleep "$poll_seconds"
  done
}

run_loop() {
  local rc state need_setup=1
  while :; do
    ensure_ready
    if ((recreated)); then need_setup=1; fi
    if ((need_setup)); then
      if ! setup; then
        count_failure "setting up the workers failed"
        continue
      fi
      need_setup=0
    fi
    rc=0
    launch || rc=$?
    if ((rc == 0)); then
      log "run finished"
      return 0
    fi
    sleep "$poll_seconds" # let a preemption show in the state
    state=$(get_state)
    if is_ready "$state" && ((rc != 255)); then
      log "the run failed with exit code $rc on a healthy slice; not relaunching"
      return "$rc"
    fi
    count_failure "run interrupted (exit code $rc, state $state)"
  done
}

# --------------------------------------------------------------------------------------- commands
case $command in
  create)
    create_cmd
    if ((dry_run)); then
      note "then poll until the state is READY (queued resource: ACTIVE):"
      state_cmd
    elif ((queued)); then
      wait_ready
    fi
    ;;
  setup)
    setup
    ;;
  run)
    if ((dry_run)); then
      note "state check (NOT_FOUND: create; PREEMPTED/SUSPENDED/...: delete and create; wait until ready):"
      state_cmd
      setup
      launch
      note "after a preemption (or a lost ssh connection) the state is checked again; a preempted" \
        "slice is recreated:"
      delete_cmd
      create_cmd
      note "then the setup and launch commands above run again (at most ${max_restarts} retries)"
    else
      run_loop
    fi
    ;;
  status)
    if ((queued)); then
      run gcloud compute tpus queued-resources describe "$name" "${loc[@]}"
    fi
    run gcloud compute tpus tpu-vm describe "$name" "${loc[@]}"
    ;;
  delete)
    delete_cmd
    ;;
esac
