"""Accelerator benchmark: sampler, train step and one RL step of random Qwen2.5-shaped models in bf16.

    bash bench/gpu.sh [--cpu-smoke] [--out FILE]          (= python -m bench.gpu ...)

For each model (Qwen2.5-0.5B and Qwen2.5-1.5B shapes, random weights, bf16 compute) three phases run:

- ``sampler``: `passk_jax.sampling.Sampler` on bf16 parameters, P prompts x n samples, no EOS (every row
  decodes `max_new_tokens`, so the work is fixed). tokens/s = generated tokens / wall time of `sample`
  (prefill included). Decode bandwidth utilisation = bytes read per decode step (all bf16 parameters +
  the KV cache slots a step must attend to: each prompt's shared bucket once + each row's tokens so far,
  averaged over the steps) x decode steps / decode time / the card's peak HBM bandwidth; decode time =
  sample time - prefill time
  (the prefill program timed on its own).
- ``train_step``: `passk_jax.rl.step.make_train_step` (AdamW, f32 master parameters, bf16 compute,
  old_logprobs="sampler", gradient accumulation over micro-batches). tokens/s counts every position of
  every row; MFU = (6 N + 12 L H d_h S) x tokens / time / peak dense bf16 FLOP/s (N = matmul parameters
  including the LM head; PaLM convention, attention counted as if not causal).
- ``rl_step``: sample (from the training parameters) -> a verifier-free synthetic reward on the host
  (a completion passes iff most of its tokens are even ids) -> `rollout.to_batch` -> the train step
  (same shapes as ``train_step``, so it reuses that compilation). tokens/s = trained positions / total.

Each model runs in its own child process (`--child`), which appends one JSON line per phase to a results
file; the parent kills a child that outlives the total budget (8 minutes by default) and reports the phase
that was running as a timeout. Before each phase the child skips it, with the reason, when its time
estimate does not fit in what is left. An out-of-memory error is caught per phase and shown in the table.
The table is printed last.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback

BUDGET_S = 480.0          # the whole command, start to table
RESERVE_S = 10.0          # kept for printing the table
PHASES = ("sampler", "train_step", "rl_step")

# Peak numbers per card (dense bf16 FLOP/s, HBM bytes/s), matched against jax.devices()[0].device_kind.
CARDS = (("H200", 989e12, 4.8e12), ("H100 PCIe", 756e12, 2.0e12), ("H100", 989e12, 3.35e12))

# (hidden, intermediate, layers, heads, kv heads); vocab 151936, tied embeddings, QKV bias, rope 1e6.
QWEN25 = {"qwen2.5-0.5b": (896, 4864, 24, 14, 2), "qwen2.5-1.5b": (1536, 8960, 28, 12, 2)}


@dataclasses.dataclass(frozen=True)
class Sizes:
    sample_prompts: int
    sample_n: int
    sample_prompt_len: int
    sample_new: int
    train_prompts: int
    train_n: int
    train_prompt_len: int
    train_new: int
    microbatches: int
    repeats: int


GPU_SIZES = Sizes(sample_prompts=16, sample_n=16, sample_prompt_len=128, sample_new=512,
                  train_prompts=8, train_n=8, train_prompt_len=128, train_new=384, microbatches=8, repeats=3)
SMOKE_SIZES = Sizes(sample_prompts=2, sample_n=2, sample_prompt_len=16, sample_new=16,
                    train_prompts=2, train_n=2, train_prompt_len=16, train_new=16, microbatches=2, repeats=1)

# Conservative first-run estimates (seconds, compile included) per phase, scaled by model size; a later
# model's estimate scales the previous model's measured time instead.
GPU_ESTIMATE_S = {"sampler": 60.0, "train_step": 75.0, "rl_step": 45.0}
SMOKE_ESTIMATE_S = {"sampler": 5.0, "train_step": 8.0, "rl_step": 5.0}


def model_config(name: str, param_dtype: str = "bfloat16", scan_layers: bool = True):
    from passk_jax.models.transformer import ModelConfig
    if name == "tiny":
        return ModelConfig.tiny(vocab_size=512, dtype="bfloat16", param_dtype=param_dtype, scan_layers=scan_layers)
    d, f, layers, heads, kv = QWEN25[name]
    return ModelConfig(vocab_size=151936, hidden_size=d, intermediate_size=f, num_layers=layers,
                       num_heads=heads, num_kv_heads=kv, rope_theta=1e6, rms_norm_eps=1e-6,
                       tie_word_embeddings=True, attention_bias=True, max_position_embeddings=32768,
                       dtype="bfloat16", param_dtype=param_dtype, scan_layers=scan_layers, family="qwen2")


def matmul_params(cfg) -> int:
    D, F, H, KV, hd, L, V = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads,
                             cfg.head_dim, cfg.num_layers, cfg.vocab_size)
    return L * (2 * D * H * hd + 2 * D * KV * hd + 3 * D * F) + D * V


def train_flops_per_token(cfg, seq: int) -> float:
    return 6.0 * matmul_params(cfg) + 12.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq


def card_peaks(kind: str) -> tuple[float | None, float | None]:
    for name, flops, bw in CARDS:
        if name.lower() in kind.lower():
            return flops, bw
    return None, None


# ------------------------------------------------------------------------------------------ child side
class Child:
    def __init__(self, args):
        import jax
        self.jax = jax
        self.args = args
        self.sizes = SMOKE_SIZES if args.cpu_smoke else GPU_SIZES
        self.device = jax.devices()[0]
        self.peak_flops, self.peak_bw = card_peaks(self.device.device_kind)
        self.rng_seed = 0
        self.scan = args.scan_layers == "true"
        self.state = None  # train state shared by train_step and rl_step
        self.train_fn = None

    def mem_gib(self) -> float | None:
        try:
            stats = self.device.memory_stats() or {}
        except Exception:  # noqa: BLE001 - backends without memory stats
            return None
        peak = stats.get("peak_bytes_in_use")
        return None if peak is None else peak / 2**30

    def prompts(self, num: int, max_len: int, seed: int) -> list[list[int]]:
        import numpy as np
        rng = np.random.default_rng(seed)
        vocab = self.cfg.vocab_size
        return [rng.integers(1, vocab, int(rng.integers(max_len // 2, max_len + 1))).tolist()
                for _ in range(num)]

    # -- sampler on bf16 parameters
    def phase_sampler(self) -> dict:
        import numpy as np
        from passk_jax.models.transformer import init
        from passk_jax.sampling import Sampler, left_pad
        jax, s = self.jax, self.sizes
        cfg = model_config(self.args.model, "bfloat16", self.scan)
        graphdef, params = init(cfg, seed=0)
        sampler = Sampler(graphdef, cfg)
        params = sampler.prepare(params)  # the decode copy, made once per policy update in training
        prompts = self.prompts(s.sample_prompts, s.sample_prompt_len, 1)
        prompts[0] = prompts[0] + [1] * (s.sample_prompt_len - len(prompts[0]))  # fixed bucket
        kw = dict(num_samples=s.sample_n, max_new_tokens=s.sample_new, temperature=1.0, top_p=1.0, eos_ids=())

        def run(i):
            out = sampler.sample(params, prompts, key=jax.random.PRNGKey(i), **kw)
            jax.block_until_ready(out.tokens)
            return out

        t0 = time.perf_counter()
        out = run(0)
        first = time.perf_counter() - t0
        times = []
        for i in range(s.repeats):
            t0 = time.perf_counter()
            out = run(i + 1)
            times.append(time.perf_counter() - t0)
        t = min(times)
        rows, new = out.tokens.shape
        assert int(np.asarray(out.lengths).min()) == new, "rows stopped early"
        # prefill alone (same compiled program the sampler used)
        bucket = sampler.validate(prompts, num_samples=s.sample_n, max_new_tokens=new, temperature=1.0,
                                  top_p=1.0, top_k=0, eos_ids=())
        toks, pos, mask = left_pad(prompts, bucket, sampler.pad_id)
        pre = []
        for _ in range(max(2, s.repeats)):
            t0 = time.perf_counter()
            jax.block_until_ready(sampler._prefill(params, jax.numpy.asarray(toks), jax.numpy.asarray(pos),
                                                   jax.numpy.asarray(mask)))
            pre.append(time.perf_counter() - t0)
        t_decode = max(t - min(pre), 1e-9)
        steps = new - 1  # the first token comes from the prefill logits
        param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
        kv_per_slot = cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * 2  # one row's bf16 k and v
        # step t (1..new-1) reads each prompt's shared prefix once (bucket slots per prompt) and each row's
        # own t completion slots
        slots_per_step = len(prompts) * bucket + rows * (new / 2.0)
        bytes_per_step = param_bytes + kv_per_slot * slots_per_step
        bw = bytes_per_step * steps / t_decode
        res = dict(tokens_per_s=rows * new / t, time_s=t, first_call_s=first, prefill_s=min(pre),
                   decode_ms_per_step=1e3 * t_decode / steps, bytes_per_step_gb=bytes_per_step / 1e9,
                   achieved_gbps=bw / 1e9, rows=rows, new_tokens=new, bucket=bucket,
                   util=None if self.peak_bw is None else bw / self.peak_bw)
        del params, sampler, out
        return res

    # -- train step on f32 master parameters
    def make_batch(self, rows_per_prompt: int, num_prompts: int, prompt_len: int, new: int, seed: int):
        import numpy as np
        from passk_jax.rl import rollout
        rng = np.random.default_rng(seed)
        prompts = self.prompts(num_prompts, prompt_len, seed)
        prompts[0] = prompts[0] + [1] * (prompt_len - len(prompts[0]))
        R = num_prompts * rows_per_prompt
        lengths = rng.integers(new // 2, new + 1, R).astype(np.int32)
        mask = np.arange(new)[None] < lengths[:, None]
        tokens = np.where(mask, rng.integers(1, self.cfg.vocab_size, (R, new)), 0).astype(np.int32)
        # behaviour log-probs near a random model's (about -log V), so ratios stay near 1 and few tokens clip
        behaviour = -math.log(self.cfg.vocab_size) + 0.05 * rng.standard_normal((R, new))
        logprobs = np.where(mask, behaviour, 0.0).astype(np.float32)
        rewards = self.reward(tokens, mask).reshape(num_prompts, rows_per_prompt)
        r = rollout.Rollouts([None] * num_prompts, prompts, tokens, logprobs, mask, lengths, lengths >= new,
                             [""] * R, rewards, {})
        return rollout.to_batch(r, bucket=prompt_len, pad_id=0)

    @staticmethod
    def reward(tokens, mask):
        """Verifier-free synthetic reward: 1 iff most completion tokens are even ids (about half pass)."""
        import numpy as np
        even = ((tokens % 2 == 0) & mask).sum(1)
        return (2 * even > mask.sum(1)).astype(np.float32)

    def ensure_train(self):
        if self.state is not None:
            return
        from passk_jax import parallel
        from passk_jax.models.transformer import init
        from passk_jax.rl import step as st
        jax, s = self.jax, self.sizes
        cfg = model_config(self.args.model, "float32", self.scan)
        graphdef, params = init(cfg, seed=0)
        step_cfg = st.StepConfig(estimator="grpo", old_logprobs="sampler", learning_rate=1e-6, warmup_steps=0,
                                 num_microbatches=s.microbatches)
        mesh = parallel.make_mesh(data=1, devices=jax.devices()[:1])
        init_state, self.train_fn = st.make_train_step(graphdef, step_cfg, mesh, params)
        self.state = init_state(params)
        self.train_graphdef = graphdef
        del params

    def phase_train_step(self) -> dict:
        jax, s = self.jax, self.sizes
        self.ensure_train()
        batch = self.make_batch(s.train_n, s.train_prompts, s.train_prompt_len, s.train_new, seed=2)
        R, S = batch.tokens.shape

        def run():
            self.state, m = self.train_fn(self.state, batch)
            jax.block_until_ready((self.state, m))
            return m

        t0 = time.perf_counter()
        m = run()
        first = time.perf_counter() - t0
        times = []
        for _ in range(s.repeats):
            t0 = time.perf_counter()
            m = run()
            times.append(time.perf_counter() - t0)
        t = min(times)
        loss = float(m["loss"]) if "loss" in m else float("nan")
        flops = train_flops_per_token(self.cfg, S) * R * S
        return dict(tokens_per_s=R * S / t, time_s=t, first_call_s=first, rows=R, seq=S,
                    tflops=flops / t / 1e12, loss=loss,
                    util=None if self.peak_flops is None else flops / t / self.peak_flops)

    def phase_rl_step(self) -> dict:
        import numpy as np
        from passk_jax.rl import rollout
        from passk_jax.sampling import Sampler
        jax, s = self.jax, self.sizes
        self.ensure_train()
        sampler = Sampler(self.train_graphdef, self.cfg)
        prompts = self.prompts(s.train_prompts, s.train_prompt_len, 3)
        prompts[0] = prompts[0] + [1] * (s.train_prompt_len - len(prompts[0]))

        def one(i):
            t = {}
            t0 = time.perf_counter()
            out = sampler.sample(self.state.params, prompts, num_samples=s.train_n, max_new_tokens=s.train_new,
                                 temperature=1.0, top_p=1.0, eos_ids=(), key=jax.random.PRNGKey(100 + i))
            tokens, logprobs, mask, lengths, truncated = jax.device_get(
                (out.tokens, out.logprobs, out.mask, out.lengths, out.truncated))
            t["sample"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            rewards = self.reward(tokens, mask).reshape(s.train_prompts, s.train_n)
            r = rollout.Rollouts([None] * len(prompts), prompts, tokens, logprobs, mask, lengths, truncated,
                                 [""] * tokens.shape[0], rewards, {})
            batch = rollout.to_batch(r, bucket=s.train_prompt_len, pad_id=0)
            t["reward"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            self.state, m = self.train_fn(self.state, batch)
            jax.block_until_ready((self.state, m))
            t["train"] = time.perf_counter() - t0
            return t, batch

        t0 = time.perf_counter()
        one(0)
        first = time.perf_counter() - t0
        t, batch = one(1)
        total = sum(t.values())
        R, S = batch.tokens.shape
        return dict(tokens_per_s=R * S / total, time_s=total, first_call_s=first, sample_s=t["sample"],
                    reward_s=t["reward"], train_s=t["train"], rows=R, seq=S,
                    pass_rate=float(np.mean(batch.rewards)), util=None)

    def run(self) -> None:
        self.cfg = model_config(self.args.model, "float32", self.scan)
        deadline = self.args.deadline
        estimates = json.loads(self.args.estimates)
        with open(self.args.results, "a") as f:
            for phase in PHASES:
                if phase not in self.args.phases.split(","):
                    continue
                row = dict(model=self.args.model, phase=phase, params=self.cfg.num_params(),
                           device=self.device.device_kind)
                left = deadline - time.time()
                est = estimates[phase]
                if est > left:
                    row.update(status="skipped", note=f"estimate {est:.0f}s > {left:.0f}s left of the budget")
                else:
                    f.write(json.dumps(dict(row, status="running")) + "\n")
                    f.flush()
                    t0 = time.perf_counter()
                    try:
                        row.update(getattr(self, "phase_" + phase)(), status="ok")
                    except Exception as e:  # noqa: BLE001 - each phase reports its own failure
                        msg = f"{type(e).__name__}: {e}"
                        oom = any(k in msg for k in ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory",
                                                     "OOM"))
                        row.update(status="OOM" if oom else "error", note=msg.strip().splitlines()[0][:160])
                        traceback.print_exc()
                        self.state, self.train_fn = None, None  # rebuilt (fresh memory) by the next phase
                    row["wall_s"] = time.perf_counter() - t0
                    gc.collect()
                row["peak_gib"] = self.mem_gib()
                f.write(json.dumps(row) + "\n")
                f.flush()
                print(f"[{self.args.model}] {phase}: {row['status']} "
                      f"{json.dumps({k: v for k, v in row.items() if k not in ('model', 'phase', 'status')})}",
                      flush=True)


# ------------------------------------------------------------------------------------------ parent side
def fmt_rate(x) -> str:
    return "-" if x is None else f"{x:,.0f}"


def table(rows: list[dict], header: str) -> str:
    lines = [header,
             f"{'model':<13} {'phase':<10} {'status':<8} {'tokens/s':>11} {'util':>11} {'step s':>7} "
             f"{'1st s':>6} {'peak GiB':>8}  notes"]
    for r in rows:
        util = r.get("util")
        kind = "HBM" if r["phase"] == "sampler" else ("MFU" if r["phase"] == "train_step" else "")
        util_s = f"{kind} {100 * util:.1f}%" if util is not None else \
            (f"{kind} n/a" if kind and r.get("status") == "ok" else "-")
        note = r.get("note", "")
        if r.get("status") == "ok":
            if r["phase"] == "sampler":
                note = (f"{r['rows']} rows x {r['new_tokens']} new, prompt {r['bucket']}; "
                        f"{r['decode_ms_per_step']:.2f} ms/decode step, {r['achieved_gbps']:.0f} GB/s")
            elif r["phase"] == "train_step":
                note = f"{r['rows']} rows x {r['seq']} pos; {r['tflops']:.1f} TFLOP/s"
            else:
                note = (f"sample {r['sample_s']:.2f}s + reward {r['reward_s']:.3f}s + train {r['train_s']:.2f}s; "
                        f"pass {r['pass_rate']:.2f}")
        step = r.get("time_s")
        first = r.get("first_call_s")
        peak = r.get("peak_gib")
        lines.append(f"{r['model']:<13} {r['phase']:<10} {r.get('status', '?'):<8} "
                     f"{fmt_rate(r.get('tokens_per_s')):>11} {util_s:>11} "
                     f"{'-' if step is None else f'{step:.3f}':>7} {'-' if first is None else f'{first:.1f}':>6} "
                     f"{'-' if peak is None else f'{peak:.1f}':>8}  {note}")
    return "\n".join(lines)


def parent(args) -> int:
    start = time.time()
    budget = args.budget_s
    deadline = start + budget - RESERVE_S
    models = args.models.split(",") if args.models else (["tiny"] if args.cpu_smoke else list(QWEN25))
    base_est = dict(SMOKE_ESTIMATE_S if args.cpu_smoke else GPU_ESTIMATE_S)
    env = dict(os.environ)
    if args.cpu_smoke:
        env["JAX_PLATFORMS"] = "cpu"
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
    sizes = SMOKE_SIZES if args.cpu_smoke else GPU_SIZES
    phases = [p for p in PHASES if p in args.phases.split(",")]
    rows: list[dict] = []
    prev: dict[str, tuple[float, float]] = {}
    prev_params = None
    device_kind = "cpu" if args.cpu_smoke else "unknown (no phase ran)"
    with tempfile.TemporaryDirectory() as tmp:
        for model in models:
            cfg = model_config(model)
            n = cfg.num_params()
            scale = 1.0 if prev_params is None else n / prev_params
            # measured wall of the previous model's phase, its timed runs scaled by the parameter ratio
            # (compilation time barely grows with size), else the fixed first-run estimate
            est = {p: (prev[p][0] + prev[p][1] * (max(1.0, scale) - 1.0) if p in prev
                       else base_est[p] * max(1.0, n / 0.5e9)) for p in PHASES}
            results = os.path.join(tmp, f"{model}.jsonl")
            left = deadline - time.time()
            if left < min(est.values()):
                rows += [dict(model=model, phase=p, status="skipped", params=n,
                              note=f"{left:.0f}s left of the {budget:.0f}s budget") for p in phases]
                continue
            cmd = [sys.executable, "-m", "bench.gpu", "--child", "--model", model, "--results", results,
                   "--deadline", str(deadline), "--estimates", json.dumps(est), "--phases", ",".join(phases)]
            cmd += ["--scan-layers", args.scan_layers]
            if args.cpu_smoke:
                cmd.append("--cpu-smoke")
            proc = subprocess.Popen(cmd, env=env)
            try:
                rc = proc.wait(timeout=max(1.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                rc = "timeout"
            done: dict[str, dict] = {}
            if os.path.exists(results):
                with open(results) as f:
                    for line in f:
                        r = json.loads(line)
                        done[r["phase"]] = r
                        device_kind = r.get("device", device_kind)
            for p in phases:
                r = done.get(p)
                if r is None:
                    r = dict(model=model, phase=p, status="skipped", params=n,
                             note=f"child ended ({rc}) before this phase")
                elif r["status"] == "running":
                    r.update(status="timeout" if rc == "timeout" else "crashed",
                             note="killed at the budget" if rc == "timeout" else f"child exit {rc}")
                if r.get("status") == "ok" and "wall_s" in r:
                    runs = r["first_call_s"] + r["time_s"] * (1 if p == "rl_step" else sizes.repeats)
                    prev[p] = (r["wall_s"], runs)
                rows.append(r)
            prev_params = n
    import jax  # version only: the parent never touches the device (the children own it)
    kind = device_kind
    flops, bw = card_peaks(kind)
    peaks = "no peak numbers for this device" if flops is None else \
        f"peak {flops / 1e12:.0f} TFLOP/s bf16, {bw / 1e12:.2f} TB/s HBM"
    header = (f"passk_jax bench.gpu | {kind} | {peaks} | jax {jax.__version__} | scan_layers {args.scan_layers} | "
              f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC | {time.time() - start:.0f}s total")
    out = table(rows, header)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(header=header, device=kind, rows=rows, table=out), f, indent=1, default=str)
    print("\n" + out, flush=True)
    # OOM, timeouts and skips are results (shown in the table); a crash or an unexpected error fails the run
    return 1 if any(r.get("status") in ("error", "crashed") for r in rows) else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny model and batch on the CPU (CI)")
    ap.add_argument("--out", default=None, help="also write the rows and the table as JSON")
    ap.add_argument("--budget-s", type=float, default=BUDGET_S, help="total wall-clock budget")
    ap.add_argument("--models", default=None, help="comma list of: tiny, " + ", ".join(QWEN25))
    ap.add_argument("--phases", default=",".join(PHASES), help="comma list of: " + ", ".join(PHASES))
    ap.add_argument("--scan-layers", choices=("true", "false"), default="true",
                    help="lax.scan over the layer stack (true) or unrolled layers with per-layer KV caches")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--results", help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--estimates", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        Child(args).run()
        return 0
    return parent(args)


if __name__ == "__main__":
    sys.exit(main())
