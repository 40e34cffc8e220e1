"""Policy-gradient step throughput vs an equivalent PyTorch eager step (HF Qwen2ForCausalLM), same weights.

    python -m bench.train_step [--presets tiny,small] [--prompts 16] [--samples 8] [--prompt-len 24]
                               [--completion-len 128] [--repeats 1] [--microbatches 1]
                               [--attention auto,plain]

Both sides take the same batch (P prompts x n samples; left-padded prompts + right-padded completions;
128 rows x 152 positions by default) and do one update: forward, token log-probs, GRPO advantages, the
token-mean clip-higher surrogate against the batch's old log-probs, backward, global-norm clipping, AdamW.
`--microbatches K` splits the rows into K gradient-accumulation micro-batches on both sides (each micro-batch
loss divided by the whole batch's token count, so the update is the same); on a CPU smaller micro-batches
keep activations in cache and both sides get faster. Ours is `passk_jax.rl.step` (old_logprobs="sampler",
one mini-batch, one jitted program; it also computes the entropy and all step metrics). Each side runs once to warm up (JAX compiles), then `repeats` rounds
run both in turn (the CPU is shared and its load drifts); the ratio is best against best, and the median of
the per-round ratios is printed beside it. Tokens/s counts every position of every row.

Model FLOPs/token uses the PaLM convention 6 N + 12 L H d_h S (N = matmul parameters incl. the LM head),
so achieved FLOP/s = FLOPs/token x tokens/s, and MFU = that / peak on an accelerator.
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from bench.common import interleaved_times, median_ratio, twin_models
from passk_jax import parallel
from passk_jax.models.transformer import ModelConfig, forward
from passk_jax.rl import step as st
from passk_jax.rl.batch import Batch, batch_shardings

EPS_LOW, EPS_HIGH, LR, CLIP = 0.2, 0.28, 1e-6, 1.0


def flops_per_token(cfg: ModelConfig, seq: int) -> float:
    D, F, H, KV, hd, L, V = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads,
                             cfg.head_dim, cfg.num_layers, cfg.vocab_size)
    matmul_params = L * (2 * D * H * hd + 2 * D * KV * hd + 3 * D * F) + D * V
    return 6.0 * matmul_params + 12.0 * L * H * hd * seq


def make_batch(cfg: ModelConfig, P: int, n: int, prompt_len: int, completion_len: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    R, S = P * n, prompt_len + completion_len
    tokens = rng.integers(1, cfg.vocab_size, (R, S)).astype(np.int32)
    token_mask = np.ones((R, S), bool)
    loss_mask = np.zeros((R, S), bool)
    for r in range(R):
        plen = rng.integers(prompt_len // 2, prompt_len + 1)
        clen = rng.integers(completion_len // 2, completion_len + 1)
        token_mask[r, : prompt_len - plen] = False
        token_mask[r, prompt_len + clen:] = False
        loss_mask[r, prompt_len: prompt_len + clen] = True
    tokens = np.where(token_mask, tokens, 0).astype(np.int32)
    positions = np.maximum(np.cumsum(token_mask, 1) - 1, 0).astype(np.int32)
    rewards = (rng.uniform(size=(P, n)) < 0.3).astype(np.float32)
    return tokens, positions, token_mask, loss_mask, rewards


def bench_preset(preset: str, P: int, n: int, prompt_len: int, completion_len: int, repeats: int,
                 microbatches: int = 1, attention: str = "auto") -> dict:
    model, graphdef, params, cfg = twin_models(preset, attention=attention)
    tokens, positions, token_mask, loss_mask, rewards = make_batch(cfg, P, n, prompt_len, completion_len)
    R, S = tokens.shape

    # old log-probs: the current policy's, slightly perturbed so that some tokens clip (same on both sides)
    logits, _ = jax.jit(forward, static_argnums=0)(graphdef, params, tokens, positions, token_mask)
    lp = np.asarray(st.losses.shifted_logprobs_and_entropy(logits, jnp.asarray(tokens))[0])
    old = np.where(loss_mask, lp + 0.05 * np.random.default_rng(1).normal(size=lp.shape), 0).astype(np.float32)
    del logits

    # ---- ours
    step_cfg = st.StepConfig(estimator="grpo", old_logprobs="sampler", learning_rate=LR, warmup_steps=0,
                             eps_low=EPS_LOW, eps_high=EPS_HIGH, grad_clip_norm=CLIP, weight_decay=0.01,
                             num_microbatches=microbatches)
    mesh = parallel.make_mesh(data=1, devices=jax.devices()[:1])
    init, train_step = st.make_train_step(graphdef, step_cfg, mesh, params)
    state = init(params)
    batch = jax.device_put(Batch(tokens, positions, token_mask, loss_mask, old, rewards,
                                 np.ones((P, n), bool)), batch_shardings(mesh))
    box = [state]

    def run_jax():
        box[0], m = train_step(box[0], batch)
        jax.block_until_ready(m)

    t0 = time.perf_counter()
    run_jax()
    jax_first = time.perf_counter() - t0

    # ---- PyTorch eager, same weights and loss
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    ids, pos = torch.from_numpy(tokens.astype(np.int64)), torch.from_numpy(positions.astype(np.int64))
    attn = torch.from_numpy(token_mask.astype(np.int64))
    mask = torch.from_numpy(loss_mask[:, 1:]).float()
    old_t = torch.from_numpy(old[:, 1:])
    r = torch.from_numpy(rewards)
    adv = ((r - r.mean(1, keepdim=True)) / (r.std(1, unbiased=False, keepdim=True) + 1e-6)).reshape(R, 1)

    def run_torch():
        denom = mask.sum()  # the whole batch's token count: accumulation is exact for any split
        for c in range(microbatches):
            rows = slice(c * R // microbatches, (c + 1) * R // microbatches)
            logits = model(input_ids=ids[rows], attention_mask=attn[rows],
                           position_ids=pos[rows]).logits[:, :-1].float()
            logp = torch.log_softmax(logits, -1).gather(-1, ids[rows, 1:, None])[..., 0]
            ratio = torch.exp(logp - old_t[rows])
            a = adv[rows]
            loss_tok = torch.maximum(-a * ratio, -a * torch.clamp(ratio, 1 - EPS_LOW, 1 + EPS_HIGH))
            ((loss_tok * mask[rows]).sum() / denom).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)

    run_torch()  # warm-up
    times = interleaved_times({"torch": run_torch, "jax": run_jax}, repeats)
    tokens_per_step = R * S
    return dict(preset=preset, attention=attention, params=cfg.num_params(), flops=flops_per_token(cfg, S),
                torch=tokens_per_step / min(times["torch"]), jax=tokens_per_step / min(times["jax"]),
                jax_first=jax_first, median_ratio=median_ratio(times, "torch", "jax"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="tiny,small")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=24)
    ap.add_argument("--completion-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--microbatches", type=int, default=1,
                    help="gradient-accumulation split of the batch, the same on both sides")
    ap.add_argument("--attention", default="auto", help="comma-separated ModelConfig.attention kernels to compare "
                    "(auto = blocked on CPU)")
    args = ap.parse_args()
    print(f"{args.prompts * args.samples} rows x {args.prompt_len + args.completion_len} positions; "
          f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), transformers {transformers.__version__}; "
          f"micro-batches (both sides): {args.microbatches}")
    rows = [bench_preset(p, args.prompts, args.samples, args.prompt_len, args.completion_len, args.repeats,
                         args.microbatches, a) for p in args.presets.split(",") for a in args.attention.split(",")]
    print("| preset | attention | params | FLOPs/token | PyTorch eager tok/s | passk_jax tok/s | ratio "
          "| median of per-round ratios | passk_jax GFLOP/s | first call (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['preset']} | {r['attention']} | {r['params'] / 1e6:.1f}M | {r['flops'] / 1e6:.1f}M | {r['torch']:,.0f} | "
              f"{r['jax']:,.0f} | {r['jax'] / r['torch']:.2f}x | {r['median_ratio']:.2f}x | "
              f"{r['jax'] * r['flops'] / 1e9:.1f} | {r['jax_first']:.1f} |")


if __name__ == "__main__":
    main()
