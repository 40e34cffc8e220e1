"""Multi-process runs: two processes on localhost (launch/local_multiprocess.sh, one CPU device each) are one
multi-controller JAX job that must train exactly like one process over two virtual CPU devices.

Both layouts run the same programs over a ('data'=2) mesh; every cross-device reduction then adds exactly two
operands, and a + b == b + a in IEEE arithmetic, so we expect (and assert) bit-identical losses, metrics and
parameters, not just close ones. Rollouts are sampled in two chunks per step (rollout.sample_prompts=2), so
the rows each process scores are not the rows it trains on and the batch gather moves rows between processes
(evaluation uses the same chunk size and no greedy pass, which spares sampler compilations), and decoded by
continuous batching over 4 slots per call (each process holds its slots).

Checkpoints cross the process layouts both ways: the step-1 checkpoint of the 2-process run resumes in one
process, the 1-process run's in two, and both finish with the uninterrupted run's parameters.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from passk_jax import parallel
from passk_jax.rl import rollout
from passk_jax.run.metric_log import read_jsonl
from passk_jax.sampling import PaddedPrompts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch", "local_multiprocess.sh")
STEPS = 2
OVERRIDES = {
    "task.options.train_sizes": "(5,)", "task.options.test_sizes": "(5,)", "task.num_train": 64,
    "rollout.prompts_per_step": 4, "rollout.num_samples": 4, "rollout.max_new_tokens": 12,
    "rollout.sample_prompts": 2, "rollout.decode_slots": 4, "step.k": 2, "train.steps": STEPS,
    "train.checkpoint_every": 1,
    "train.eval_every": 0, "eval.num_prompts": 4, "eval.num_samples": 4, "eval.sample_prompts": 2,
    "eval.greedy": False,
    "sft.steps": 2, "sft.num_examples": 32, "sft.batch_size": 8,
}
SKIP = ("time", "perf/", "sft/time_s")  # wall-clock values


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(compile_cache: str, devices: int | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PASSK_")}
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    if devices is not None:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    env.update(XLA_FLAGS=" ".join(flags), JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
               # each layout compiles its programs once per module, its resume run reuses them
               JAX_COMPILATION_CACHE_DIR=compile_cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return env


def _start(processes: int, workdir: str, sft_cache: str, compile_cache: str, log: str) -> subprocess.Popen:
    """`experiments.run` on the tiny config: 2 processes x 1 device via the launcher, or 1 process x 2."""
    cmd = [sys.executable, "-m", "experiments.run", "--config=passk_k4", f"--workdir={workdir}",
           f"--config.sft.cache_dir={sft_cache}"] + [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
    if processes == 1:
        env = _env(compile_cache, devices=2)
    else:
        env = _env(compile_cache)
        cmd = ["bash", LAUNCH, str(processes), "--devices-per-process", "1", "--port", str(_free_port()), "--"] + cmd
    out = open(log, "w")
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _finish(procs: dict[str, subprocess.Popen], logs: dict[str, str], timeout: float = 600) -> None:
    try:
        for name, proc in procs.items():
            rc = proc.wait(timeout=timeout)
            assert rc == 0, f"{name} exited with {rc}:\n" + open(logs[name]).read()[-6000:]
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=30)


def _resume_copy(src: str, dst: str, step: int) -> None:
    """``dst`` = the workdir ``src`` as it was right after checkpoint ``step``: later checkpoints, later rows
    of metrics.jsonl and the final results removed (a resume refuses results newer than its checkpoints)."""
    shutil.copytree(src, dst)
    ckpts = os.path.join(dst, "checkpoints")
    for name in os.listdir(ckpts):
        if name.isdigit() and int(name) > step:
            shutil.rmtree(os.path.join(ckpts, name))
    for name in ("eval_final.json", "report.md", "training_curves.png", "pass_at_k.png", "hf_export"):
        path = os.path.join(dst, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)
    metrics = os.path.join(dst, "metrics.jsonl")
    kept = [line for line in open(metrics) if json.loads(line)["step"] <= step and "phase" not in json.loads(line)]
    with open(metrics, "w") as f:
        f.writelines(kept)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Uninterrupted 1-process (2 devices) and 2-process runs side by side, then each resumed from the other's
    step-1 checkpoint in the other layout (side by side again)."""
    base = tmp_path_factory.mktemp("multiprocess")
    wd = {name: str(base / name) for name in ("single", "multi", "multi_then_single", "single_then_multi")}
    cache = {1: str(base / "jit_cache_1proc"), 2: str(base / "jit_cache_2proc")}
    logs = {name: str(base / f"{name}.log") for name in wd}
    procs = {"single": _start(1, wd["single"], str(base / "sft_1"), cache[1], logs["single"]),
             "multi": _start(2, wd["multi"], str(base / "sft_2"), cache[2], logs["multi"])}
    _finish(procs, logs)
    _resume_copy(wd["multi"], wd["multi_then_single"], 1)
    _resume_copy(wd["single"], wd["single_then_multi"], 1)
    procs = {"multi_then_single": _start(1, wd["multi_then_single"], str(base / "sft_1"), cache[1],
                                         logs["multi_then_single"]),
             "single_then_multi": _start(2, wd["single_then_multi"], str(base / "sft_2"), cache[2],
                                         logs["single_then_multi"])}
    _finish(procs, logs)
    return dict(wd=wd, logs=logs)


def _params(workdir: str, step: int = STEPS) -> list[np.ndarray]:
    """Parameter leaves of a checkpoint as numpy (whatever devices wrote it)."""
    import orbax.checkpoint as ocp

    path = os.path.join(workdir, "checkpoints", str(step), "state")
    with ocp.PyTreeCheckpointer() as ckpt:
        tree = ckpt.metadata(path).item_metadata.tree
        args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        state = ckpt.restore(path, restore_args=args)
    return [np.asarray(x) for x in jax.tree.leaves(state["params"])]


def _records(workdir: str, skip: tuple[str, ...] = SKIP) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith(skip)}
            for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))]


def _assert_same_params(a: str, b: str) -> None:
    pa, pb = _params(a), _params(b)
    assert len(pa) == len(pb) > 0
    for x, y in zip(pa, pb):
        np.testing.assert_array_equal(x, y)


def test_two_processes_match_one_process(runs):
    single, multi = runs["wd"]["single"], runs["wd"]["multi"]
    ra, rb = _records(single), _records(multi)
    # one record per write: only process 0 writes (steps 0 = SFT + initial eval, 1..3, final eval)
    assert [r["step"] for r in rb] == [r["step"] for r in ra] == [0, 0, *range(1, STEPS + 1), STEPS]
    assert ra == rb  # losses, rewards, pass@k, entropy, eval, verifier counters (summed over processes)
    assert "step/loss" in rb[2] and "eval/pass@4" in rb[-1] and "sft/final_loss" in rb[0]
    for name in ("eval_initial.json", "eval_final.json"):
        assert json.load(open(os.path.join(single, name))) == json.load(open(os.path.join(multi, name)))
    _assert_same_params(single, multi)
    for name in ("config.json", "report.md", "hf_export/config.json", "tokenizer/tokenizer.json"):
        assert os.path.exists(os.path.join(multi, name)), name
    with open(os.path.join(single, "hf_export", "model.safetensors"), "rb") as f1, \
            open(os.path.join(multi, "hf_export", "model.safetensors"), "rb") as f2:
        assert f1.read() == f2.read()
    log = open(runs["logs"]["multi"]).read()
    assert "[p0] done" in log and "[p1] done" in log


def test_checkpoints_resume_across_process_counts(runs):
    single = runs["wd"]["single"]
    for name in ("multi_then_single", "single_then_multi"):
        resumed = runs["wd"][name]
        assert "warm start" not in open(runs["logs"][name]).read(), name  # resumed: no SFT, no initial eval
        assert os.path.exists(os.path.join(resumed, "hf_export", "model.safetensors")), name  # exported
        _assert_same_params(single, resumed)
        # a fresh start would have appended a second 0, 0, 1, ... sequence; a resume truncates after step 1.
        # Verifier counters count since the process started, so they restart with the resumed run.
        skip = SKIP + ("verifier/",)
        assert _records(resumed, skip) == _records(single, skip), name


# --------------------------------------------------------------------------------------------- helpers
HELPERS_CHECK = textwrap.dedent("""
    import numpy as np, jax
    from jax.sharding import NamedSharding, PartitionSpec as P
    from passk_jax import parallel
    assert parallel.initialize_distributed()
    me, mesh = jax.process_index(), parallel.make_mesh()
    rows = NamedSharding(mesh, P(("data", "fsdp")))
    x = jax.device_put(np.arange(8 * 3).reshape(8, 3), rows)           # rows 0-3 on process 0, 4-7 on 1
    owners = parallel.row_owners(x)
    assert owners.tolist() == [0] * 4 + [1] * 4, owners
    mine = np.flatnonzero(owners == me)
    np.testing.assert_array_equal(parallel.fetch_rows(x, mine), np.arange(24).reshape(8, 3)[mine])
    g = parallel.put_global(np.arange(8.0), rows)                       # the same host value everywhere
    np.testing.assert_array_equal(parallel.fetch_rows(g, mine), mine.astype(float))
    rep = jax.device_put(np.arange(6), NamedSharding(mesh, P()))       # replicated: process 0 handles all
    assert parallel.row_owners(rep).tolist() == [0] * 6
    local = {"v": (mine * 10).astype(np.float32), "id": mine.astype(np.int64) << 40, "ok": mine % 2 == 0}
    full = parallel.gather_rows(local, owners)
    assert full["v"].tolist() == [10.0 * i for i in range(8)]
    assert full["ok"].tolist() == [i % 2 == 0 for i in range(8)] and full["id"].tolist() == [i << 40 for i in range(8)]
    assert parallel.allgather(np.float64(me + 0.1)).tolist() == [0.1, 1.1]
    assert parallel.process_max({"t": me + 1.5}) == {"t": 2.5} and parallel.process_sum({"n": 2}) == {"n": 4}
    assert parallel.process_any(me == 1) and not parallel.process_any(False)
    print("helpers ok", me)
""")


def test_helpers_in_two_processes(tmp_path):
    script = tmp_path / "check.py"
    script.write_text(HELPERS_CHECK)
    cmd = ["bash", LAUNCH, "2", "--devices-per-process", "1", "--port", str(_free_port()), "--",
           sys.executable, str(script)]
    env = _env(str(tmp_path / "jit_cache"))
    env["PYTHONPATH"] = ROOT
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "[p0] helpers ok 0" in out.stdout and "[p1] helpers ok 1" in out.stdout


def test_helpers_are_identities_in_one_process():
    owners = parallel.row_owners(jnp.arange(5))
    assert owners.tolist() == [0] * 5
    local = {"v": np.arange(5, dtype=np.float32)}
    np.testing.assert_array_equal(parallel.gather_rows(local, owners)["v"], local["v"])
    assert parallel.process_max({"a": 1.0}) == {"a": 1.0} and parallel.process_any(True)
    np.testing.assert_array_equal(parallel.fetch_rows(jnp.arange(6).reshape(3, 2), np.array([2, 0])),
                                  [[4, 5], [0, 1]])


def test_device_rows_batch_equals_host_batch():
    """The multi-process batch path (rows stay on the devices, selected and concatenated lazily, gathered by
    one jitted program) builds exactly the host path's batch, here after a dynamic-sampling-style
    select + concat over two sampler calls."""
    mesh = parallel.make_mesh(data=2, devices=jax.devices()[:2])
    n, t = 2, 5

    def part(num_prompts, seed):
        r = np.random.default_rng(seed)
        rows = num_prompts * n
        lengths = r.integers(1, t + 1, rows)
        mask = np.arange(t)[None] < lengths[:, None]
        tokens = np.where(mask, r.integers(3, 50, (rows, t)), 0).astype(np.int32)
        logprobs = np.where(mask, -r.random((rows, t)), 0).astype(np.float32)
        prompts = PaddedPrompts.pad([list(r.integers(3, 50, r.integers(1, 6))) for _ in range(num_prompts)], (8,),
                                    pad_id=0)
        rewards = r.random((num_prompts, n)).astype(np.float32)
        return prompts, tokens, logprobs, mask, lengths.astype(np.int32), rewards

    host, device = [], []
    for i, num_prompts in enumerate((4, 2)):
        prompts, tokens, logprobs, mask, lengths, rewards = part(num_prompts, i)
        common = dict(lengths=lengths, truncated=lengths == t, texts=[str(x) for x in tokens.tolist()],
                      rewards=rewards, timings={})
        examples = [None] * num_prompts
        host.append(rollout.Rollouts(examples, prompts, tokens, logprobs, mask, **common))
        put = lambda a: jax.device_put(a, parallel.logical_sharding(mesh, ("batch", None), a.shape))  # noqa: E731
        device.append(rollout.Rollouts(examples, prompts, *(rollout.DeviceRows([put(a)])
                                                            for a in (tokens, logprobs, mask)), **common))
    keep = [np.array([True, False, True, True]), np.array([False, True])]
    pick = lambda parts: rollout.Rollouts.concat([p.select(k) for p, k in zip(parts, keep)])  # noqa: E731
    h, d = pick(host), pick(device)
    assert isinstance(d.tokens, rollout.DeviceRows) and d.tokens.shape == h.tokens.shape == (8, t)
    hb, db = rollout.to_batch(h), rollout.to_batch(d)
    for name, x, y in zip(hb._fields, hb, db):
        assert y.dtype == x.dtype, name
        np.testing.assert_array_equal(np.asarray(y), x, err_msg=name)
    assert db.tokens.sharding.spec == parallel.logical_spec(("batch", None), mesh)
