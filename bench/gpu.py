"""Accelerator benchmark: sampler, train step and one RL step of random Qwen2.5-shaped models in bf16, plus
variants of the decode layout, the KV-cache dtype, the training attention kernel and XLA command buffers.

    bash bench/gpu.sh [--cpu-smoke] [--out FILE]          (= python -m bench.gpu ...)

Three phases run per model (Qwen2.5-1.5B, then Qwen2.5-0.5B shapes; random weights, bf16 compute):

- ``sampler``: `passk_jax.sampling.Sampler` reading the bf16 decode copy (`Sampler.prepare`) of f32 master
  parameters, P prompts (bucket 1536) x n samples x 512 new tokens = 2k context, no EOS (every row decodes
  `max_new_tokens`, so the work is fixed). tokens/s = generated tokens / wall time of `sample` (prefill
  included). Decode bandwidth utilisation (% of the HBM roofline) = bytes a decode step must read (the
  weights as the decode receives them + the KV cache slots a step must attend to: each prompt's shared
  bucket once + each row's tokens so far, averaged over the steps) x decode steps / decode time / the card's
  peak HBM bandwidth; decode time = sample time - prefill time (the prefill program timed on its own).
- ``train_step``: `passk_jax.rl.step.make_train_step` (AdamW, f32 master parameters, bf16 compute,
  old_logprobs="sampler", gradient accumulation over micro-batches, `ModelConfig.attention="auto"`).
  tokens/s counts every position of every row; MFU = (6 N + 12 L H d_h S) x tokens / time / peak dense bf16
  FLOP/s (N = matmul parameters including the LM head; PaLM convention, attention counted as if not causal).
- ``rl_step``: sample (from the training parameters) -> a verifier-free synthetic reward on the host
  (a completion passes iff most of its tokens are even ids) -> `rollout.to_batch` -> the train step
  (same shapes as ``train_step``, so it reuses that compilation). tokens/s = trained positions / total.

Variants (rows of the same table; only on the first model, `--variants` picks the groups), each changing
one thing against the ``default`` row of its phase:

- ``layout``: sampler ``layout=training`` (`Sampler(decode_layout="training")`: the decode reads the f32
  master weights and casts them at use) vs ``default`` (decode_layout="replicated": the bf16 copy).
- ``kv``: sampler ``kv=f32``: a float32 KV cache with bf16 weights and compute (`Sampler(kv_dtype="float32")`;
  default: the compute dtype); the row records the dtype of the cache the prefill actually returned.
- ``attn``: train_step at a 4x longer sequence (16 rows x 2,048 positions, same tokens per micro-batch as
  the default row) with ``attn=cudnn`` / ``attn=blocked`` / ``attn=plain`` (`ModelConfig.attention`);
  cuDNN is skipped, with the reason, off a GPU or outside its limits.
- ``cmdbuf``: sampler and train_step ``cmdbuf=off``: a second child process of the model with
  ``--xla_gpu_enable_command_buffer=`` (no command buffers) appended to XLA_FLAGS; the default rows run with
  XLA's default command buffers.
- ``slots``: the continuous-batching workload of `bench.rollout_lengths`, run last in the main child (after
  ``rl_step``, so the rows above keep the budget): the model's body with a 512-token vocabulary instead of
  151,936 (random weights, f32 compute as there: with bf16 a row's logits depend on the batch shape in the
  last bits and a few samples flip; 4 EOS ids give roughly geometric lengths, mean about max_new_tokens / 4,
  capped at 512), 16 prompts x 16 samples = 256 rows, sampler ``slots=lockstep`` (`sample(..., decode_slots=0)`) then
  ``slots=64`` (`decode_slots=64`) with the same key; the tokens must be identical (asserted, recorded as
  ``tokens_identical``). tokens/s = useful tokens (completion tokens, EOS included) / wall time of `sample`;
  the util column shows slot utilisation = useful tokens / (decode steps x rows in flight) (lockstep: max
  length x rows; slots: `bench.rollout_lengths.slot_steps` x slots); the note gives the speed-up vs
  lockstep. No target.

Each child process (one per model, one more for ``cmdbuf``) appends one JSON line per row to a results file;
the parent kills a child that outlives the total budget (8 minutes by default) and reports the row that was
running as a timeout. Before each row the child skips it, with the reason, when its time estimate does not
fit in what is left. An out-of-memory error is caught per row and shown in the table. Rows that did not
run print "not measured" in the utilisation column, never an estimate. The table is printed last.
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

from passk_jax.models.families import CHECKPOINTS  # pure data: imports no jax

BUDGET_S = 480.0          # the whole command, start to table
RESERVE_S = 10.0          # kept for printing the table
PHASES = ("sampler", "train_step", "rl_step")
VARIANT_GROUPS = ("layout", "kv", "attn", "cmdbuf", "slots")
ATTN_KERNELS = ("cudnn", "blocked", "plain")
CMDBUF_OFF_FLAG = "--xla_gpu_enable_command_buffer="
# table order of the rows of each phase
VARIANT_ORDER = ("default", "layout=training", "kv=f32", "cmdbuf=off", "slots=lockstep", "slots=") + tuple(
    f"attn={k}" for k in ATTN_KERNELS)
SLOTS_VOCAB = 512         # the slots rows' vocabulary (so that SLOTS_EOS ids end a row with probability ~eos/512)
SLOTS_EOS = 4
SLOTS_PROMPT_LEN = 24
NOT_RUN = ("skipped", "timeout", "OOM", "error", "crashed")

# Peak numbers per card (dense bf16 FLOP/s, HBM bytes/s), matched against jax.devices()[0].device_kind.
CARDS = (("H200", 989e12, 4.8e12), ("H100 PCIe", 756e12, 2.0e12), ("H100", 989e12, 3.35e12))

# The benchmarked models, in run order; their shapes are passk_jax/models/families.py's Qwen2.5 checkpoints.
QWEN25 = ("qwen2.5-1.5b", "qwen2.5-0.5b")

# Targets (issue 9): decode >= 50% of the HBM roofline at 256 rows and 2k context, train step >= 40% MFU,
# both for Qwen2.5-1.5B; shown next to every row of that model and phase.
TARGETS = {("qwen2.5-1.5b", "sampler"): ("HBM", 0.50), ("qwen2.5-1.5b", "train_step"): ("MFU", 0.40)}


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
    long_prompts: int       # the attention variants' longer train step
    long_n: int
    long_prompt_len: int
    long_new: int
    long_microbatches: int
    sample_repeats: int     # timed calls after the warm-up (best counts)
    train_repeats: int
    slots_prompts: int      # the continuous-batching rows (16 samples per prompt)
    slots_new: int
    slots: int
    slots_repeats: int


GPU_SIZES = Sizes(sample_prompts=16, sample_n=16, sample_prompt_len=1536, sample_new=512,
                  train_prompts=8, train_n=8, train_prompt_len=128, train_new=384, microbatches=8,
                  long_prompts=2, long_n=8, long_prompt_len=512, long_new=1536, long_microbatches=8,
                  sample_repeats=1, train_repeats=2, slots_prompts=16, slots_new=512, slots=64, slots_repeats=2)
SMOKE_SIZES = Sizes(sample_prompts=2, sample_n=2, sample_prompt_len=16, sample_new=16,
                    train_prompts=2, train_n=2, train_prompt_len=16, train_new=16, microbatches=2,
                    long_prompts=1, long_n=4, long_prompt_len=16, long_new=48, long_microbatches=2,
                    sample_repeats=1, train_repeats=1, slots_prompts=4, slots_new=64, slots=16, slots_repeats=1)

# Conservative first-run estimates (seconds, compile included) per row shape for a 1.5B model (scaled by
# size, at least x0.6); once a row of the same shape has run, its measured wall x ESTIMATE_MARGIN is used.
GPU_ESTIMATE_S = {"sampler": 60.0, "train_step": 40.0, "train_long": 45.0, "rl_step": 35.0, "slots_lockstep": 40.0,
                  "slots": 40.0}
SMOKE_ESTIMATE_S = {"sampler": 5.0, "train_step": 8.0, "train_long": 8.0, "rl_step": 5.0, "slots_lockstep": 5.0,
                    "slots": 5.0}
ESTIMATE_MARGIN = 1.25


def model_config(name: str, param_dtype: str = "bfloat16", scan_layers: bool = True, attention: str = "auto"):
    from passk_jax.models.transformer import ModelConfig
    if name == "tiny":
        return ModelConfig.tiny(vocab_size=512, dtype="bfloat16", param_dtype=param_dtype, scan_layers=scan_layers,
                                attention=attention)
    return ModelConfig.named(name, dtype="bfloat16", param_dtype=param_dtype, scan_layers=scan_layers,
                             attention=attention)


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


def shape_key(phase: str, variant: str) -> str:
    """Rows with the same key run the same shapes (their measured walls estimate each other)."""
    if variant.startswith("slots="):
        return "slots_lockstep" if variant == "slots=lockstep" else "slots"
    return "train_long" if variant.startswith("attn=") else phase


def variant_rank(v: str) -> int:
    if v.startswith("slots=") and v != "slots=lockstep":
        v = "slots="
    return VARIANT_ORDER.index(v) if v in VARIANT_ORDER else len(VARIANT_ORDER)


def child_rows(phases: list[str], groups: list[str], main: bool, slots: int = 64) -> list[tuple[str, str]]:
    """(phase, variant) rows of a model's default-environment child, in run order."""
    rows = []
    if "sampler" in phases:
        rows.append(("sampler", "default"))
        if main and "layout" in groups:
            rows.append(("sampler", "layout=training"))
        if main and "kv" in groups:
            rows.append(("sampler", "kv=f32"))
    if "train_step" in phases:
        rows.append(("train_step", "default"))
        if main and "attn" in groups:
            rows += [("train_step", f"attn={k}") for k in ATTN_KERNELS]
    if "rl_step" in phases:
        rows.append(("rl_step", "default"))
    if main and "slots" in groups and "sampler" in phases:  # last: the rows above keep the budget
        rows += [("sampler", "slots=lockstep"), ("sampler", f"slots={slots}")]
    return rows


class Skip(Exception):
    """A row that cannot run here (shown as skipped with the reason)."""


# ------------------------------------------------------------------------------------------ child side
class Child:
    def __init__(self, args):
        import jax
        from passk_jax import parallel
        self.jax = jax
        self.args = args
        self.sizes = SMOKE_SIZES if args.cpu_smoke else GPU_SIZES
        self.device = jax.devices()[0]
        self.peak_flops, self.peak_bw = card_peaks(self.device.device_kind)
        self.scan = args.scan_layers == "true"
        self.mesh = parallel.make_mesh(data=1, devices=jax.devices()[:1])
        self.master = None  # (graphdef, f32 params) shared by the sampler rows and the train state's init
        self.state = None   # train state shared by the train_step and rl_step rows
        self.train_fn = None
        self.slots_model = None     # (sampler, weights) of the slots rows (vocab SLOTS_VOCAB)
        self.slots_lockstep = None  # (tokens, best time) of the slots=lockstep row

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
        out = [rng.integers(1, vocab, int(rng.integers(max_len // 2, max_len + 1))).tolist() for _ in range(num)]
        out[0] = out[0] + [1] * (max_len - len(out[0]))  # fixed bucket
        return out

    def master_params(self):
        if self.master is None:
            from passk_jax.models.transformer import init
            self.master = init(self.cfg, seed=0)
        return self.master

    @staticmethod
    def timed(fn, repeats: int):
        """(last result, first-call seconds, best of `repeats` timed calls after it)."""
        t0 = time.perf_counter()
        out = fn(0)
        first = time.perf_counter() - t0
        times = []
        for i in range(repeats):
            t0 = time.perf_counter()
            out = fn(i + 1)
            times.append(time.perf_counter() - t0)
        return out, first, min(times)

    # -- sampler: decode copy of f32 master parameters ("replicated") or the master weights ("training")
    def phase_sampler(self, variant: str) -> dict:
        import numpy as np
        from passk_jax.sampling import Sampler
        jax, s = self.jax, self.sizes
        if variant.startswith("slots="):
            return self.sampler_slots(variant)
        layout = "training" if variant == "layout=training" else "replicated"
        graphdef, master = self.master_params()
        sampler = Sampler(graphdef, self.cfg, decode_layout=layout, buckets=(s.sample_prompt_len,),
                          kv_dtype="float32" if variant == "kv=f32" else None)
        prompts = self.prompts(s.sample_prompts, s.sample_prompt_len, 1)
        kw = dict(num_samples=s.sample_n, max_new_tokens=s.sample_new, temperature=1.0, top_p=1.0, eos_ids=())
        weights = sampler.prepare(master)  # made once per policy update in training
        jax.block_until_ready(weights.params)

        def run(i):
            out = sampler.sample(weights, prompts, key=jax.random.PRNGKey(i), **kw)
            jax.block_until_ready(out.tokens)
            return out

        out, first, t = self.timed(run, s.sample_repeats)
        rows, new = out.tokens.shape
        assert int(np.asarray(out.lengths).min()) == new, "rows stopped early"
        # prefill alone (the same compiled program the sampler used)
        bucket = sampler.validate(prompts, num_samples=s.sample_n, max_new_tokens=new, temperature=1.0,
                                  top_p=1.0, top_k=0, eos_ids=())
        pre = []
        for _ in range(2):
            t0 = time.perf_counter()
            cache, _ = jax.block_until_ready(sampler.prefill(weights, prompts))
            pre.append(time.perf_counter() - t0)
        t_decode = max(t - min(pre), 1e-9)
        steps = new - 1  # the first token comes from the prefill logits
        leaves = jax.tree.leaves(weights.params)
        param_bytes = sum(x.size * x.dtype.itemsize for x in leaves)
        kv_dtype = jax.tree.leaves(cache.k)[0].dtype
        kv_per_slot = self.cfg.num_layers * 2 * self.cfg.num_kv_heads * self.cfg.head_dim * kv_dtype.itemsize
        # step t (1..new-1) reads each prompt's shared prefix once (bucket slots per prompt) and each row's
        # own t completion slots
        slots_per_step = len(prompts) * bucket + rows * (new / 2.0)
        bytes_per_step = param_bytes + kv_per_slot * slots_per_step
        bw = bytes_per_step * steps / t_decode
        res = dict(tokens_per_s=rows * new / t, time_s=t, first_call_s=first, prefill_s=min(pre),
                   decode_ms_per_step=1e3 * t_decode / steps, bytes_per_step_gb=bytes_per_step / 1e9,
                   achieved_gbps=bw / 1e9, rows=rows, new_tokens=new, bucket=bucket, layout=sampler.layout_for(master),
                   weight_dtype=str(leaves[0].dtype), kv_dtype=str(kv_dtype),
                   util=None if self.peak_bw is None else bw / self.peak_bw)
        del weights, sampler, out, cache
        return res

    # -- continuous batching vs lockstep (bench.rollout_lengths's workload) on the model's body, vocab 512
    def sampler_slots(self, variant: str) -> dict:
        import numpy as np
        from bench.rollout_lengths import slot_steps
        from passk_jax.models.transformer import init
        from passk_jax.sampling import Sampler
        jax, s = self.jax, self.sizes
        slots = 0 if variant == "slots=lockstep" else int(variant.split("=", 1)[1])
        if self.slots_model is None:
            # the last rows of the child: free the train state and the master parameters first
            self.state = self.train_fn = self.master = None
            gc.collect()
            # f32 compute as in bench.rollout_lengths: with bf16 the logits of a row depend on the batch shape
            # in the last bits (lockstep decodes all rows, the slots SLOTS at a time), which flips a few samples
            cfg = dataclasses.replace(self.cfg, vocab_size=SLOTS_VOCAB, dtype="float32")
            graphdef, params = init(cfg, seed=0)
            sampler = Sampler(graphdef, cfg)
            weights = sampler.prepare(params)
            jax.block_until_ready(weights.params)
            del params
            gc.collect()
            self.slots_model = (sampler, weights, cfg.dtype)
        sampler, weights, dtype = self.slots_model
        rng = np.random.default_rng(0)
        n = 16
        prompts = [rng.integers(SLOTS_EOS + 1, SLOTS_VOCAB, SLOTS_PROMPT_LEN).tolist()
                   for _ in range(s.slots_prompts)]
        kw = dict(num_samples=n, max_new_tokens=s.slots_new, temperature=1.0, top_p=1.0,
                  eos_ids=list(range(1, SLOTS_EOS + 1)), key=jax.random.PRNGKey(0), decode_slots=slots)

        def run(_):
            return jax.block_until_ready(sampler.sample(weights, prompts, **kw))

        out, first, t = self.timed(run, s.slots_repeats)
        tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
        rows, new = len(prompts) * n, s.slots_new
        useful = int(lengths.sum())
        steps = int(lengths.max()) if slots == 0 else slot_steps(lengths, slots)
        in_flight = rows if slots == 0 else slots
        res = dict(tokens_per_s=useful / t, time_s=t, first_call_s=first, rows=rows, new_tokens=new,
                   slots=slots, useful_tokens=useful, decode_steps=steps, in_flight=in_flight,
                   util=useful / (steps * in_flight), len_mean=float(lengths.mean()),
                   len_median=float(np.median(lengths)), len_max=int(lengths.max()),
                   at_cap=float((lengths == new).mean()), eos_ids=SLOTS_EOS, vocab=SLOTS_VOCAB,
                   body=self.args.model, compute_dtype=dtype, speedup=None, tokens_identical=None)
        if slots == 0:
            self.slots_lockstep = (tokens, t)
        elif self.slots_lockstep is not None:
            lock_tokens, lock_t = self.slots_lockstep
            same = lock_tokens.shape == tokens.shape and bool(np.array_equal(lock_tokens, tokens))
            assert same, (f"continuous batching changed the tokens of the same key: "
                          f"{int((lock_tokens != tokens).any(1).sum())} of {rows} rows differ")
            res.update(tokens_identical=same, speedup=lock_t / t)
        del out
        return res

    # -- train step on f32 master parameters
    def make_batch(self, rows_per_prompt: int, num_prompts: int, prompt_len: int, new: int, seed: int):
        import numpy as np
        from passk_jax.rl import rollout
        from passk_jax.sampling import PaddedPrompts
        rng = np.random.default_rng(seed)
        prompts = self.prompts(num_prompts, prompt_len, seed)
        R = num_prompts * rows_per_prompt
        lengths = rng.integers(new // 2, new + 1, R).astype(np.int32)
        mask = np.arange(new)[None] < lengths[:, None]
        tokens = np.where(mask, rng.integers(1, self.cfg.vocab_size, (R, new)), 0).astype(np.int32)
        # behaviour log-probs near a random model's (about -log V), so ratios stay near 1 and few tokens clip
        behaviour = -math.log(self.cfg.vocab_size) + 0.05 * rng.standard_normal((R, new))
        logprobs = np.where(mask, behaviour, 0.0).astype(np.float32)
        rewards = self.reward(tokens, mask).reshape(num_prompts, rows_per_prompt)
        r = rollout.Rollouts([None] * num_prompts, PaddedPrompts.pad(prompts, (prompt_len,), pad_id=0), tokens,
                             logprobs, mask, lengths, lengths >= new, [""] * R, rewards, {})
        return rollout.to_batch(r)

    @staticmethod
    def reward(tokens, mask):
        """Verifier-free synthetic reward: 1 iff most completion tokens are even ids (about half pass)."""
        import numpy as np
        even = ((tokens % 2 == 0) & mask).sum(1)
        return (2 * even > mask.sum(1)).astype(np.float32)

    def step_config(self, microbatches: int):
        from passk_jax.rl import step as st
        return st.StepConfig(estimator="grpo", old_logprobs="sampler", learning_rate=1e-6, warmup_steps=0,
                             num_microbatches=microbatches)

    def ensure_train(self):
        if self.state is not None:
            return
        from passk_jax.rl import step as st
        graphdef, params = self.master_params()
        init_state, self.train_fn = st.make_train_step(graphdef, self.step_config(self.sizes.microbatches),
                                                       self.mesh, params)
        self.state = init_state(params)
        self.train_graphdef = graphdef
        self.master = None  # the state holds its own copy; the sampler rows ran before
        del params
        gc.collect()

    def phase_train_step(self, variant: str) -> dict:
        from passk_jax.models.transformer import Transformer, no_cache_kernel, split
        jax, s = self.jax, self.sizes
        self.ensure_train()
        if variant.startswith("attn="):
            from flax import nnx
            from passk_jax.models import attention
            from passk_jax.rl import step as st
            kernel = variant.split("=", 1)[1]
            if kernel == "cudnn":
                if jax.default_backend() != "gpu":
                    raise Skip(f"cuDNN attention needs a GPU (backend {jax.default_backend()})")
                why = attention.cudnn_limits(self.cfg.dtype, self.cfg.head_dim)
                if why:
                    raise Skip(why)
            cfg = dataclasses.replace(self.cfg, attention=kernel)
            graphdef = split(nnx.eval_shape(lambda: Transformer(cfg)))[0]  # same parameters, other kernel
            _, train_fn = st.make_train_step(graphdef, self.step_config(s.long_microbatches), self.mesh,
                                             self.state.params)
            batch = self.make_batch(s.long_n, s.long_prompts, s.long_prompt_len, s.long_new, seed=4)
            micro = s.long_microbatches
        else:
            cfg, train_fn, micro = self.cfg, self.train_fn, s.microbatches
            batch = self.make_batch(s.train_n, s.train_prompts, s.train_prompt_len, s.train_new, seed=2)
        R, S = batch.tokens.shape

        def run(_):
            self.state, m = train_fn(self.state, batch)
            jax.block_until_ready((self.state, m))
            return m

        m, first, t = self.timed(run, s.train_repeats)
        loss = float(m["loss"]) if "loss" in m else float("nan")
        flops = train_flops_per_token(self.cfg, S) * R * S
        return dict(tokens_per_s=R * S / t, time_s=t, first_call_s=first, rows=R, seq=S, microbatches=micro,
                    attention=no_cache_kernel(cfg), tflops=flops / t / 1e12, loss=loss,
                    util=None if self.peak_flops is None else flops / t / self.peak_flops)

    def phase_rl_step(self, variant: str) -> dict:
        import numpy as np
        from passk_jax.rl import rollout
        from passk_jax.sampling import Sampler
        jax, s = self.jax, self.sizes
        self.ensure_train()
        sampler = Sampler(self.train_graphdef, self.cfg)
        prompts = self.prompts(s.train_prompts, s.train_prompt_len, 3)

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
            r = rollout.Rollouts([None] * len(prompts), out.prompts, tokens, logprobs, mask, lengths, truncated,
                                 [""] * tokens.shape[0], rewards, {})  # the sampler's bucket: train_prompt_len
            batch = rollout.to_batch(r)
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
        measured: dict[str, float] = {}
        with open(self.args.results, "a") as f:
            for phase, variant in json.loads(self.args.rows):
                key = shape_key(phase, variant)
                row = dict(model=self.args.model, phase=phase, variant=variant, params=self.cfg.num_params(),
                           device=self.device.device_kind, xla_flags=os.environ.get("XLA_FLAGS", ""))
                left = deadline - time.time()
                est = measured[key] * ESTIMATE_MARGIN if key in measured else estimates[key]
                if est > left:
                    row.update(status="skipped",
                               note=f"estimate {est:.0f}s > {max(0.0, left):.0f}s left of the budget")
                else:
                    f.write(json.dumps(dict(row, status="running")) + "\n")
                    f.flush()
                    t0 = time.perf_counter()
                    try:
                        row.update(getattr(self, "phase_" + phase)(variant), status="ok")
                    except Skip as e:
                        row.update(status="skipped", note=str(e))
                    except Exception as e:  # noqa: BLE001 - each row reports its own failure
                        msg = f"{type(e).__name__}: {e}"
                        oom = any(k in msg for k in ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory",
                                                     "OOM"))
                        row.update(status="OOM" if oom else "error", note=msg.strip().splitlines()[0][:160])
                        traceback.print_exc()
                        self.state, self.train_fn = None, None  # rebuilt (fresh memory) by the next row
                    row["wall_s"] = time.perf_counter() - t0
                    if row["status"] == "ok":
                        measured.setdefault(key, row["wall_s"])
                    gc.collect()
                row["peak_gib"] = self.mem_gib()
                f.write(json.dumps(row) + "\n")
                f.flush()
                rest = {k: v for k, v in row.items() if k not in ("model", "phase", "variant", "status")}
                print(f"[{self.args.model} {phase} {variant}] {row['status']} {json.dumps(rest)}", flush=True)


# ------------------------------------------------------------------------------------------ parent side
def fmt_rate(x) -> str:
    return "-" if x is None else f"{x:,.0f}"


def util_cells(r: dict) -> tuple[str, str, str]:
    """(measured utilisation, target, met) for a row; a row that did not run is "not measured"."""
    slots = str(r.get("variant", "")).startswith("slots=")
    kind = "slots" if slots else {"sampler": "HBM", "train_step": "MFU"}.get(r["phase"], "")
    target = None if slots else TARGETS.get((r["model"], r["phase"]))
    target_s = "-" if target is None else f">={100 * target[1]:.0f}% {target[0]}"
    if r.get("status") != "ok":
        return "not measured", target_s, "-"
    util = r.get("util")
    if not kind:
        return "-", target_s, "-"
    if util is None:
        return f"{kind} n/a", target_s, "-"
    return f"{kind} {100 * util:.1f}%", target_s, "-" if target is None else ("yes" if util >= target[1] else "no")


def row_note(r: dict) -> str:
    if r.get("status") != "ok":
        return r.get("note", "")
    extra = "; XLA command buffers off" if r.get("variant") == "cmdbuf=off" else ""
    if str(r.get("variant", "")).startswith("slots="):
        body = "Qwen2.5-1.5B" if r["body"] == "qwen2.5-1.5b" else "Qwen2.5-0.5B" if r["body"] == "qwen2.5-0.5b" \
            else r["body"]
        vs = "" if r["slots"] == 0 else (
            "; lockstep row did not run (no speed-up, tokens not compared)" if r["speedup"] is None else
            f"; {r['speedup']:.2f}x vs lockstep, tokens identical")
        real = CHECKPOINTS[r["body"]]["vocab_size"] if r["body"] in QWEN25 else None
        vocab = f"vocab {r['vocab']}" + (f" (not {real})" if real else "")
        return (f"{body} body, {vocab}, {r['compute_dtype']} compute; {r['rows']} rows x <= {r['new_tokens']} new, "
                f"{r['eos_ids']} EOS ids: lengths mean {r['len_mean']:.0f} median {r['len_median']:.0f} max "
                f"{r['len_max']} ({100 * r['at_cap']:.0f}% at the cap); {r['decode_steps']} decode steps x "
                f"{r['in_flight']} rows in flight{vs}")
    if r["phase"] == "sampler":
        return (f"{r['rows']} rows x {r['new_tokens']} new, prompt {r['bucket']} (context "
                f"{r['bucket'] + r['new_tokens']}); {r['layout']} {r['weight_dtype']} weights, KV "
                f"{r['kv_dtype']}; {r['decode_ms_per_step']:.2f} ms/decode step, {r['bytes_per_step_gb']:.3g} "
                f"GB/step, {r['achieved_gbps']:.0f} GB/s{extra}")
    if r["phase"] == "train_step":
        return (f"{r['rows']} rows x {r['seq']} pos, {r['microbatches']} micro-batches; attention "
                f"{r['attention']}; {r['tflops']:.1f} TFLOP/s{extra}")
    return (f"sample {r['sample_s']:.2f}s + reward {r['reward_s']:.3f}s + train {r['train_s']:.2f}s; "
            f"pass {r['pass_rate']:.2f}")


COLUMNS = ("model", "phase", "variant", "status", "tokens/s", "util", "target", "met", "step s", "1st s",
           "peak GiB", "notes")


def table(rows: list[dict], header: str) -> str:
    fmt = "{:<13} {:<10} {:<15} {:<8} {:>11} {:>12} {:>9} {:>3} {:>7} {:>6} {:>8}  {}"
    lines = [header, fmt.format(*COLUMNS)]
    for r in rows:
        util_s, target_s, met = util_cells(r)
        ran = r.get("status") == "ok"
        step, first, peak = r.get("time_s"), r.get("first_call_s"), r.get("peak_gib")
        lines.append(fmt.format(
            r["model"], r["phase"], r.get("variant", "default"), r.get("status", "?"),
            fmt_rate(r.get("tokens_per_s")) if ran else "-", util_s, target_s, met,
            f"{step:.3f}" if ran and step is not None else "-", f"{first:.1f}" if ran and first is not None else "-",
            "-" if peak is None else f"{peak:.1f}", row_note(r)))
    return "\n".join(lines)


def order_rows(rows: list[dict], models: list[str]) -> list[dict]:
    """Table order: model as listed, then phase, then variant (default first), stable otherwise."""
    def key(r):
        v = r.get("variant", "default")
        return (models.index(r["model"]) if r["model"] in models else len(models),
                PHASES.index(r["phase"]) if r["phase"] in PHASES else len(PHASES),
                variant_rank(v))
    return sorted(rows, key=key)


def parent(args) -> int:
    start = time.time()
    budget = args.budget_s
    deadline = start + budget - RESERVE_S
    models = args.models.split(",") if args.models else (["tiny"] if args.cpu_smoke else list(QWEN25))
    groups = [] if args.variants in ("", "none") else args.variants.split(",")
    unknown = sorted(set(groups) - set(VARIANT_GROUPS))
    if unknown:
        raise SystemExit(f"--variants: unknown groups {unknown}; choose from {VARIANT_GROUPS} or 'none'")
    base_est = dict(SMOKE_ESTIMATE_S if args.cpu_smoke else GPU_ESTIMATE_S)
    env = dict(os.environ)
    if args.cpu_smoke:
        env["JAX_PLATFORMS"] = "cpu"
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
    phases = [p for p in PHASES if p in args.phases.split(",")]
    # children in run order: (model, extra XLA flags, rows); the variants run on the first model
    jobs = []
    for i, model in enumerate(models):
        slots = (SMOKE_SIZES if args.cpu_smoke else GPU_SIZES).slots
        jobs.append((model, "", child_rows(phases, groups, main=i == 0, slots=slots)))
        if i == 0 and "cmdbuf" in groups:
            jobs.append((model, CMDBUF_OFF_FLAG, [(p, "cmdbuf=off") for p in ("sampler", "train_step")
                                                  if p in phases]))
    rows: list[dict] = []
    measured: dict[str, tuple[float, float]] = {}  # shape key -> (measured wall, that model's parameters)
    device_kind = "cpu" if args.cpu_smoke else "unknown (no phase ran)"
    with tempfile.TemporaryDirectory() as tmp:
        for j, (model, flags, job_rows) in enumerate(jobs):
            if not job_rows:
                continue
            n = model_config(model).num_params()
            keys = {shape_key(p, v) for p, v in job_rows}
            est = {}
            for k in keys:
                if k in measured:  # a row of this shape already ran (another child): its wall, scaled up by size
                    wall, n_prev = measured[k]
                    est[k] = wall * ESTIMATE_MARGIN * max(1.0, n / n_prev)
                else:
                    est[k] = base_est[k] * (1.0 if args.cpu_smoke else max(0.6, n / 1.5e9))
            results = os.path.join(tmp, f"{j}-{model}.jsonl")
            left = deadline - time.time()
            if left < min(est.values()):
                rows += [dict(model=model, phase=p, variant=v, status="skipped", params=n,
                              note=f"{max(0.0, left):.0f}s left of the {budget:.0f}s budget")
                         for p, v in job_rows]
                continue
            cmd = [sys.executable, "-m", "bench.gpu", "--child", "--model", model, "--results", results,
                   "--deadline", str(deadline), "--estimates", json.dumps(est), "--rows", json.dumps(job_rows),
                   "--scan-layers", args.scan_layers]
            if args.cpu_smoke:
                cmd.append("--cpu-smoke")
            child_env = dict(env)
            if flags:
                child_env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + flags).strip()
            proc = subprocess.Popen(cmd, env=child_env)
            try:
                rc = proc.wait(timeout=max(1.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                rc = "timeout"
            done: dict[tuple[str, str], dict] = {}
            if os.path.exists(results):
                with open(results) as f:
                    for line in f:
                        r = json.loads(line)
                        done[(r["phase"], r["variant"])] = r
                        device_kind = r.get("device", device_kind)
            for p, v in job_rows:
                r = done.get((p, v))
                if r is None:
                    r = dict(model=model, phase=p, variant=v, status="skipped", params=n,
                             note=f"child ended ({rc}) before this row")
                elif r["status"] == "running":
                    r.update(status="timeout" if rc == "timeout" else "crashed",
                             note="killed at the budget" if rc == "timeout" else f"child exit {rc}")
                if r.get("status") == "ok" and "wall_s" in r:
                    measured.setdefault(shape_key(p, v), (r["wall_s"], n))
                rows.append(r)
    import jax  # version only: the parent never touches the device (the children own it)
    kind = device_kind
    flops, bw = card_peaks(kind)
    peaks = "no peak numbers for this device" if flops is None else \
        f"peak {flops / 1e12:.0f} TFLOP/s bf16, {bw / 1e12:.2f} TB/s HBM"
    xla = env.get("XLA_FLAGS", "")
    header = (f"passk_jax bench.gpu | {kind} | {peaks} | jax {jax.__version__} | scan_layers {args.scan_layers} | "
              f"XLA_FLAGS {xla or '(none)'} | "
              f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC | {time.time() - start:.0f}s total")
    rows = order_rows(rows, models)
    out = table(rows, header)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(header=header, device=kind, columns=COLUMNS, rows=rows, table=out), f, indent=1,
                      default=str)
    print("\n" + out, flush=True)
    # OOM, timeouts and skips are results (shown in the table); a crash or an unexpected error fails the run
    return 1 if any(r.get("status") in ("error", "crashed") for r in rows) else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny model and batch on the CPU (CI)")
    ap.add_argument("--out", default=None, help="also write the rows and the table as JSON")
    ap.add_argument("--budget-s", type=float, default=BUDGET_S, help="total wall-clock budget")
    ap.add_argument("--models", default=None,
                    help="comma list of: tiny, " + ", ".join(QWEN25) + " (the variants run on the first)")
    ap.add_argument("--phases", default=",".join(PHASES), help="comma list of: " + ", ".join(PHASES))
    ap.add_argument("--variants", default=",".join(VARIANT_GROUPS),
                    help="comma list of: " + ", ".join(VARIANT_GROUPS) + ", or none")
    ap.add_argument("--scan-layers", choices=("true", "false"), default="true",
                    help="lax.scan over the layer stack (true) or unrolled layers with per-layer KV caches")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--results", help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--estimates", help=argparse.SUPPRESS)
    ap.add_argument("--rows", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        Child(args).run()
        return 0
    return parent(args)


if __name__ == "__main__":
    sys.exit(main())
