"""Side by side with Tunix (issue 9): sampler, one GRPO update and one full RL step, same weights and batch.

    python -m bench.tunix [--presets tiny,small] [--prompts 16] [--samples 8] [--new-tokens 128]
                          [--prompt-len 24] [--repeats 1] [--out FILE.json] [--tunix-venv runs/.venv-tunix]
    bash bench/tunix.sh ...                      (the same, with the project's .venv python)

Tunix (``google-tunix`` from PyPI, pinned to ``TUNIX_VERSION``) is never a dependency of passk_jax: the first
run creates its own virtual environment (``--tunix-venv``, default ``runs/.venv-tunix``, ignored by git) and
``pip install``s it there with its requirements (jax, flax, optax, ...); later runs reuse it (skipped when the
venv already has that version). ``--setup-only`` just installs.

Per preset (``ModelConfig.tiny()`` / ``.small()``, Qwen2 shape, vocab 256, f32) the driver:

1. makes random weights once (``transformer.init``, seed 0) and writes them as a Hugging Face checkpoint
   (``hf.save_pretrained``); both sides load that same file (ours through ``hf.load_pretrained``, Tunix through
   ``tunix.models.qwen2.params.create_model_from_safe_tensors``);
2. writes the batch (``batch.npz``): P prompts of random length in [prompt_len/2, prompt_len] (ids 1..V-1, the
   first one exactly prompt_len long), and for the update phase the batch of ``bench.train_step.make_batch``
   (R = P n rows of prompt_len left-padded prompt + new right-padded completion tokens, random completion
   lengths in [new/2, new], random 0/1 rewards) with old log-probs near a random model's (-log V + noise,
   as bench/gpu.py);
3. times our side in this process and Tunix's in a child process (``bench/tunix_child.py``, run by the
   Tunix venv's python), one after the other, never concurrently;
4. prints ``| preset | phase | passk_jax tok/s | Tunix tok/s | ratio |`` (ratio = passk_jax / Tunix).

Phases (each: one warm-up call that compiles, then the best of ``--repeats`` calls; each call ends with the
samples on the host or ``jax.block_until_ready``):

- ``sampler`` — P prompts x n samples x ``new`` tokens, temperature 1, top-p 1 (Tunix decodes greedily unless
  top_p is set), no top-k, no EOS stop (every row decodes ``new`` tokens), prompts left-padded to prompt_len on
  both sides. Ours: ``passk_jax.sampling.Sampler.sample`` (+ copy of tokens and log-probs to the host).
  Tunix: ``RLCluster.generate`` (its vanilla rollout = ``tunix.generate.sampler.Sampler``), the P prompts
  each repeated n times as its GRPO learner does, KV cache of prompt_len + new slots. tokens/s = P n new / s.
- ``update`` — one GRPO-style update on the same batch: forward over all positions, token log-probs, GRPO
  advantages, the token-mean clip-higher surrogate (eps 0.2 / 0.28) against the batch's old log-probs, no KL,
  backward, global-norm clipping 1.0, AdamW (lr 1e-6, weight decay 0.01). Ours: ``rl.step.make_train_step``
  (as bench/train_step.py). Tunix: its actor trainer's jitted train step with the ``grpo`` policy loss as
  ``GRPOLearner`` sets it up (``loss_agg_mode="token-mean"``, ``epsilon_high`` 0.28, ``beta=0``), given the
  old log-probs. tokens/s = R (prompt_len + new) / s, every position of every row (as bench/train_step.py).
- ``rl_step`` — sample -> verifier-free synthetic reward (1 iff most completion tokens are even ids, as
  bench/gpu.py) -> advantages -> update. Ours: as bench/gpu.py's rl_step (sampler on the training params,
  host reward, ``rollout.to_batch``, the train step). Tunix: ``GRPOLearner._generate_and_compute_advantage``
  (rollout, reward function on the decoded text, advantages) + the same jitted train step, i.e. one iteration
  of its learner loop without the data queue / metrics logging / checkpointing (which would only add time on
  its side). tokens/s = trained positions (R (prompt_len + new)) / total step time.

Not equal on the two sides (see bench/README.md): our update also computes the entropy and all step metrics
(Tunix's computes its own set); Tunix's rl_step passes no old log-probs (``num_iterations=1``: its loss then
uses the stop-gradient of the current ones), and its loss masks completion tokens equal to the pad id 0.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TUNIX_VERSION = "0.1.7"
TUNIX_REQUIREMENTS = (f"google-tunix=={TUNIX_VERSION}", "jax")  # jax: tunix reaches it only through flax
DEFAULT_VENV = "runs/.venv-tunix"
PHASES = ("sampler", "update", "rl_step")
PHASE_LABELS = {"sampler": "sampler", "update": "GRPO update", "rl_step": "full RL step"}
OPTIMIZER = dict(learning_rate=1e-6, weight_decay=0.01, grad_clip_norm=1.0)
LOSS = dict(eps_low=0.2, eps_high=0.28)


# ------------------------------------------------------------------------------------------------ arguments
def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="tiny,small", help="comma list of ModelConfig presets (tiny, small)")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--samples", type=int, default=8, help="samples per prompt (the GRPO group size)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=24, help="longest prompt = padded prompt length")
    ap.add_argument("--repeats", type=int, default=1, help="timed calls per phase after the warm-up")
    ap.add_argument("--out", default=None, help="also write the results and the table as JSON")
    ap.add_argument("--workdir", default=None, help="keep the weights and batches here (default: a temp dir)")
    ap.add_argument("--tunix-venv", default=DEFAULT_VENV, help="Tunix's own virtual environment")
    ap.add_argument("--tunix-timeout", type=float, default=3600.0, help="seconds per Tunix child process")
    ap.add_argument("--setup-only", action="store_true", help="install Tunix into its venv and stop")
    args = ap.parse_args(argv)
    args.presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    for p in args.presets:
        if p not in ("tiny", "small"):
            ap.error(f"unknown preset {p!r} (tiny, small)")
    for name in ("prompts", "new_tokens", "repeats"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.samples < 2:
        ap.error("--samples must be >= 2 (GRPO groups; Tunix requires num_generations > 1)")
    if args.prompt_len < 2:
        ap.error("--prompt-len must be >= 2")
    return args


# ------------------------------------------------------------------------------------------ Tunix's venv
def venv_python(venv: str | Path) -> Path:
    return Path(venv) / "bin" / "python"


def installed_tunix(venv: str | Path) -> str | None:
    """google-tunix's version in that venv, None if the venv or the package is missing."""
    py = venv_python(venv)
    if not py.exists():
        return None
    proc = subprocess.run([str(py), "-c", "import importlib.metadata as m; print(m.version('google-tunix'))"],
                          capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else None


def ensure_tunix(venv: str | Path) -> dict:
    """Create the venv and pip-install Tunix unless it already holds TUNIX_VERSION.
    Returns {"installed_now": bool, "install_s": seconds or None}."""
    venv = Path(venv)
    if installed_tunix(venv) == TUNIX_VERSION:
        return dict(installed_now=False, install_s=None)
    t0 = time.perf_counter()
    log = venv.parent / (venv.name + "-install.log")
    venv.parent.mkdir(parents=True, exist_ok=True)
    print(f"installing {' '.join(TUNIX_REQUIREMENTS)} into {venv} (log: {log}) ...", flush=True)
    with open(log, "w") as f:
        if not venv_python(venv).exists():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, stdout=f, stderr=subprocess.STDOUT)
        rc = subprocess.run([str(venv_python(venv)), "-m", "pip", "install", "--disable-pip-version-check",
                             *TUNIX_REQUIREMENTS], stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0 or installed_tunix(venv) != TUNIX_VERSION:
        raise RuntimeError(f"installing Tunix failed (pip exit {rc}); last lines of {log}:\n"
                           + "\n".join(log.read_text().splitlines()[-20:]))
    dt = time.perf_counter() - t0
    print(f"installed Tunix {TUNIX_VERSION} in {dt:.0f}s", flush=True)
    return dict(installed_now=True, install_s=dt)


# ------------------------------------------------------------------------------------- weights and batch
def model_spec(cfg) -> dict:
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
            "head_dim", "rope_theta", "rms_norm_eps", "tie_word_embeddings", "attention_bias")
    return {k: getattr(cfg, k) for k in keys}


def make_prompts(vocab_size: int, num: int, prompt_len: int, seed: int = 0):
    """``num`` prompts (ids 1..V-1, never the pad id 0) of random length in [prompt_len // 2, prompt_len], the
    first exactly prompt_len; returned left-padded: (i32[num, prompt_len], lengths i32[num])."""
    import numpy as np
    rng = np.random.default_rng(seed)
    lengths = rng.integers(max(1, prompt_len // 2), prompt_len + 1, num).astype(np.int32)
    lengths[0] = prompt_len
    padded = np.zeros((num, prompt_len), np.int32)
    for i, n in enumerate(lengths):
        padded[i, prompt_len - n:] = rng.integers(1, vocab_size, n)
    return padded, lengths


def make_update_batch(cfg, P: int, n: int, prompt_len: int, new: int, seed: int = 0) -> dict:
    """bench.train_step's batch + old log-probs near a random model's (-log V + N(0, 0.05), zero off the loss
    mask), as bench/gpu.py, so few tokens clip."""
    import numpy as np
    from bench.train_step import make_batch
    tokens, positions, token_mask, loss_mask, rewards = make_batch(cfg, P, n, prompt_len, new, seed)
    rng = np.random.default_rng(seed + 1)
    old = -math.log(cfg.vocab_size) + 0.05 * rng.standard_normal(tokens.shape)
    old = np.where(loss_mask, old, 0.0).astype(np.float32)
    return dict(tokens=tokens, positions=positions, token_mask=token_mask, loss_mask=loss_mask,
                old_logprobs=old, rewards=rewards)


def write_inputs(workdir: str | Path, preset: str, args: argparse.Namespace) -> dict:
    """Random weights (model/), the batch (batch.npz) and spec.json in ``workdir``; returns the spec."""
    import numpy as np
    from passk_jax.models import hf
    from passk_jax.models.transformer import ModelConfig, init

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = getattr(ModelConfig, preset)()
    if cfg.family != "qwen2" or not cfg.attention_bias:
        raise ValueError(f"preset {preset}: Tunix's Qwen2 needs a qwen2-family config with QKV bias")
    graphdef, params = init(cfg, seed=0)
    hf.save_pretrained((graphdef, params), cfg, workdir / "model")
    prompts, lengths = make_prompts(cfg.vocab_size, args.prompts, args.prompt_len, seed=0)
    batch = make_update_batch(cfg, args.prompts, args.samples, args.prompt_len, args.new_tokens, seed=0)
    np.savez(workdir / "batch.npz", prompts=prompts, prompt_lengths=lengths, **batch)
    spec = dict(preset=preset, params=cfg.num_params(), model=model_spec(cfg),
                sizes=dict(prompts=args.prompts, samples=args.samples, prompt_len=args.prompt_len,
                           new_tokens=args.new_tokens),
                repeats=args.repeats, optimizer=OPTIMIZER, loss=LOSS)
    (workdir / "spec.json").write_text(json.dumps(spec, indent=1))
    return spec


# -------------------------------------------------------------------------------------------- our side
def _best_of(fn, repeats: int):
    t0 = time.perf_counter()
    result = fn()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return first, min(times), result


def layer_stack_override(platform: str) -> dict:
    """The trainer's default ``model.scan_layers=False`` (the unrolled layer stack; only where this checkout's
    ModelConfig has the field). ``platform`` is kept for callers; the choice no longer depends on it."""
    from passk_jax.models.transformer import ModelConfig
    del platform
    if "scan_layers" not in {f.name for f in dataclasses.fields(ModelConfig)}:
        return {}
    return dict(scan_layers=False)


def run_ours(workdir: str | Path) -> dict:
    import jax
    import numpy as np

    from bench.gpu import Child
    from passk_jax import parallel
    from passk_jax.models import hf
    from passk_jax.models.transformer import split
    from passk_jax.rl import rollout
    from passk_jax.rl import step as st
    from passk_jax.rl.batch import Batch, batch_shardings
    from passk_jax.sampling import Sampler

    workdir = Path(workdir)
    spec = json.loads((workdir / "spec.json").read_text())
    s = spec["sizes"]
    P, n, plen, new, repeats = s["prompts"], s["samples"], s["prompt_len"], s["new_tokens"], spec["repeats"]
    R, S = P * n, plen + new
    data = dict(np.load(workdir / "batch.npz"))
    model, cfg = hf.load_pretrained(workdir / "model", **layer_stack_override(jax.devices()[0].platform))
    graphdef, params = split(model)
    prompts = [row[plen - length:].tolist() for row, length in zip(data["prompts"], data["prompt_lengths"])]
    results: dict = {}

    # (a) sampler
    sampler = Sampler(graphdef, cfg, buckets=(plen,))
    keys = iter(range(10**6))

    def sample(p=params):
        out = sampler.sample(p, prompts, num_samples=n, max_new_tokens=new, temperature=1.0, top_p=1.0,
                             eos_ids=(), key=jax.random.PRNGKey(next(keys)))
        host = jax.device_get((out.tokens, out.logprobs, out.mask, out.lengths, out.truncated))
        assert int(host[3].min()) == new, "rows stopped early"
        return (*host, out.prompts)

    first, t, _ = _best_of(sample, repeats)
    results["sampler"] = dict(tokens_per_s=R * new / t, time_s=t, first_call_s=first, rows=R, new_tokens=new)

    # (b) one GRPO update (as bench/train_step.py)
    opt, loss = spec["optimizer"], spec["loss"]
    step_cfg = st.StepConfig(estimator="grpo", old_logprobs="sampler", learning_rate=opt["learning_rate"],
                             warmup_steps=0, eps_low=loss["eps_low"], eps_high=loss["eps_high"],
                             grad_clip_norm=opt["grad_clip_norm"], weight_decay=opt["weight_decay"])
    mesh = parallel.make_mesh(data=1, devices=jax.devices()[:1])
    init_state, train_fn = st.make_train_step(graphdef, step_cfg, mesh, params)
    box = [init_state(params)]
    batch = jax.device_put(Batch(data["tokens"], data["positions"], data["token_mask"], data["loss_mask"],
                                 data["old_logprobs"], data["rewards"], np.ones((P, n), bool)),
                           batch_shardings(mesh))

    def update():
        box[0], m = train_fn(box[0], batch)
        jax.block_until_ready((box[0], m))
        return float(m["loss"]) if "loss" in m else float("nan")

    first, t, loss_value = _best_of(update, repeats)
    results["update"] = dict(tokens_per_s=R * S / t, time_s=t, first_call_s=first, rows=R, seq=S, loss=loss_value)

    # (c) one full RL step (as bench/gpu.py's rl_step)
    split_runs: list[dict] = []

    def rl_step():
        t0 = time.perf_counter()
        tokens, logprobs, mask, lengths, truncated, padded = sample(box[0].params)
        t1 = time.perf_counter()
        rewards = Child.reward(tokens, mask).reshape(P, n)
        r = rollout.Rollouts([None] * P, padded, tokens, logprobs, mask, lengths, truncated, [""] * R,
                             rewards, {})
        b = rollout.to_batch(r)
        t2 = time.perf_counter()
        box[0], m = train_fn(box[0], b)
        jax.block_until_ready((box[0], m))
        t3 = time.perf_counter()
        assert b.tokens.shape == (R, S)
        split_runs.append(dict(sample_s=t1 - t0, reward_s=t2 - t1, train_s=t3 - t2))
        return float(np.mean(rewards))

    first, t, pass_rate = _best_of(rl_step, repeats)
    best = min(split_runs[1:], key=lambda r: sum(r.values()))
    results["rl_step"] = dict(tokens_per_s=R * S / t, time_s=t, first_call_s=first, rows=R, seq=S,
                              pass_rate=pass_rate, **best)
    from importlib import metadata
    return dict(status="ok", phases=results, platform=jax.devices()[0].platform,
                device=jax.devices()[0].device_kind, scan_layers=getattr(cfg, "scan_layers", True),
                versions={d: metadata.version(d) for d in ("jax", "jaxlib", "flax", "optax")})


# ------------------------------------------------------------------------------------------ Tunix side
def run_tunix(workdir: str | Path, venv: str | Path, timeout: float) -> dict:
    out = Path(workdir) / "tunix_result.json"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    cmd = [str(venv_python(venv)), str(ROOT / "bench" / "tunix_child.py"), "--workdir", str(workdir),
           "--out", str(out)]
    try:
        proc = subprocess.run(cmd, env=env, cwd=str(workdir), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(status="timeout", note=f"Tunix child killed after {timeout:.0f}s")
    if proc.returncode != 0 or not out.exists():
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-25:]
        return dict(status="error", note=f"Tunix child exit {proc.returncode}", tail=tail)
    return json.loads(out.read_text())


# ------------------------------------------------------------------------------------------------- table
def _tps(side: dict, phase: str) -> float | None:
    if side.get("status") != "ok":
        return None
    return side["phases"].get(phase, {}).get("tokens_per_s")


def format_table(rows: list[dict]) -> str:
    """rows: {"preset", "ours": side result, "tunix": side result} -> the markdown comparison table."""
    lines = ["| preset | phase | passk_jax tok/s | Tunix tok/s | ratio |", "|---|---|---|---|---|"]
    for row in rows:
        for phase in PHASES:
            ours, theirs = _tps(row["ours"], phase), _tps(row["tunix"], phase)
            cells = [f"{v:,.0f}" if v is not None else row[side].get("status", "-")
                     for v, side in ((ours, "ours"), (theirs, "tunix"))]
            ratio = f"{ours / theirs:.2f}x" if ours and theirs else "-"
            lines.append(f"| {row['preset']} | {PHASE_LABELS[phase]} | {cells[0]} | {cells[1]} | {ratio} |")
    return "\n".join(lines)


def format_details(rows: list[dict]) -> str:
    """One line per preset and side: step times, first calls and the RL step's split."""
    out = []
    for row in rows:
        for side, name in (("ours", "passk_jax"), ("tunix", "Tunix")):
            r = row[side]
            if r.get("status") != "ok":
                out.append(f"- {row['preset']} {name}: {r.get('status')} {r.get('note', '')}")
                for line in r.get("tail", []):
                    out.append(f"    {line}")
                continue
            ph = r["phases"]
            rl = ph["rl_step"]
            split = (f"sample {rl['sample_s']:.2f}s + reward {rl['reward_s']:.3f}s + train {rl['train_s']:.2f}s"
                     if "sample_s" in rl else
                     f"rollout+reward+advantages {rl['rollout_reward_s']:.2f}s + train {rl['train_s']:.2f}s")
            out.append(f"- {row['preset']} {name}: sampler {ph['sampler']['time_s']:.2f}s "
                       f"(first {ph['sampler']['first_call_s']:.1f}s), update {ph['update']['time_s']:.2f}s "
                       f"(first {ph['update']['first_call_s']:.1f}s), RL step {rl['time_s']:.2f}s = {split}")
    return "\n".join(out)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.chdir(ROOT)
    args.tunix_venv = Path(args.tunix_venv).absolute()  # the child runs in the work dir
    setup = ensure_tunix(args.tunix_venv)
    if args.setup_only:
        return 0
    import jax

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_tunix_") as tmp:
        base = Path(args.workdir) if args.workdir else Path(tmp)
        for preset in args.presets:
            workdir = (base / preset).resolve()
            spec = write_inputs(workdir, preset, args)
            print(f"[{preset}] {spec['params'] / 1e6:.1f}M params: passk_jax ...", flush=True)
            try:
                ours = run_ours(workdir)
            except Exception as e:  # noqa: BLE001 - shown in the table
                ours = dict(status="error", note=f"{type(e).__name__}: {e}")
            print(f"[{preset}] Tunix ...", flush=True)
            tunix = run_tunix(workdir, args.tunix_venv, args.tunix_timeout)
            rows.append(dict(preset=preset, params=spec["params"], ours=ours, tunix=tunix))
    tv = next((r["tunix"]["versions"] for r in rows if r["tunix"].get("status") == "ok"), {})
    tplat = next((r["tunix"]["platform"] for r in rows if r["tunix"].get("status") == "ok"), "?")
    scans = {r["ours"].get("scan_layers") for r in rows if r["ours"].get("status") == "ok"}
    layers = "" if not scans else ", layers " + "/".join("scanned" if x else "unrolled" for x in sorted(scans))
    header = (f"bench.tunix | {args.prompts} prompts x {args.samples} samples x {args.new_tokens} new tokens, "
              f"prompt <= {args.prompt_len} | best of {args.repeats} after a warm-up | "
              f"passk_jax: jax {jax.__version__} ({jax.devices()[0].platform}{layers}) | "
              f"Tunix {tv.get('google-tunix', '?')}: jax {tv.get('jax', '?')}, flax {tv.get('flax', '?')} "
              f"({tplat}) | {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    params = ", ".join(f"{r['preset']} {r['params'] / 1e6:.1f}M params" for r in rows)
    table = format_table(rows)
    details = format_details(rows)
    if args.out:
        Path(args.out).write_text(json.dumps(dict(header=header, setup=setup, rows=rows, table=table), indent=1,
                                             default=str))
    print(f"\n{header}\n{params}\n\n{details}\n\n{table}", flush=True)
    ok = all(r[s].get("status") == "ok" for r in rows for s in ("ours", "tunix"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
