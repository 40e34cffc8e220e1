"""Lower bounds on the CPU time of a decode step and a train step, from this machine's own matmul speed.

    python -m bench.floor [--presets tiny,small] [--rows 128] [--seq 152] [--microbatches 1,32] [--repeats 50]

The sampler and train-step benchmarks ask for ratios against PyTorch. Whether a ratio is reachable depends
on how far below PyTorch's time the unavoidable work is. This script times, in isolation, every dense matmul
one step must do (each shape jitted alone, hot caches, best of ``repeats`` back-to-back calls: a generous
lower bound, since in the real step the weights and activations are not already in cache). Attention,
softmax, norms, RoPE, sampling, the loss and AdamW are left out: all of them are extra. Beside the decode
bound it prints the per-token time of a 1-prompt, 1-sample decode (all the ops of a step on one row). The
update is bounded for each ``--microbatches`` split (matmuls of rows/K rows, K times), as
``bench.train_step --microbatches K`` runs it.

It prints the implied ceilings on tokens/s (rows x tokens / matmul time). Where the 1-row time is a fixed
cost (``tiny``: a few MB of weights) it adds to the decode floor; at ``small`` it is mostly the weights
streamed from memory, which a 128-row step overlaps with compute. A target ratio against PyTorch is
reachable only if the PyTorch time divided by the ratio is above the floor.
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from passk_jax.models.transformer import ModelConfig, init
from passk_jax.sampling import Sampler


def dense_shapes(cfg: ModelConfig) -> list[tuple[int, int, int]]:
    """(K, N, count) of every weight matmul of one token through the model: x[.., K] @ W[K, N]."""
    D, F, H, KV, hd, L, V = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads,
                             cfg.head_dim or cfg.hidden_size // cfg.num_heads, cfg.num_layers, cfg.vocab_size)
    return [(D, H * hd, L), (D, KV * hd, 2 * L), (H * hd, D, L),  # q; k, v; o
            (D, F, 2 * L), (F, D, L),  # gate, up; down
            (D, V, 1)]  # LM head


def time_matmul(m: int, k: int, n: int, repeats: int, transpose: str = "") -> float:
    """Best seconds of one jitted [m,k]@[k,n] (``transpose``: "a" = a stored [k,m], "b" = b stored [n,k])."""
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.standard_normal((k, m) if transpose == "a" else (m, k)), jnp.float32)
    b = jnp.asarray(rng.standard_normal((n, k) if transpose == "b" else (k, n)), jnp.float32)
    if transpose == "a":
        f = jax.jit(lambda a, b: a.T @ b)
    elif transpose == "b":
        f = jax.jit(lambda a, b: a @ b.T)
    else:
        f = jax.jit(jnp.dot)
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return best


def decode_floor(cfg: ModelConfig, rows: int, repeats: int) -> tuple[float, float]:
    """(matmul seconds per decode step for ``rows`` rows, seconds per token of a 1-row decode)."""
    mm = sum(c * time_matmul(rows, k, n, repeats) for k, n, c in dense_shapes(cfg))
    graphdef, params = init(cfg)
    sampler = Sampler(graphdef, cfg)
    params = sampler.prepare(params)  # once, as in training
    prompt, new = [list(range(1, 25))], 128

    def once():
        jax.block_until_ready(sampler.sample(params, prompt, num_samples=1, max_new_tokens=new,
                                             key=jax.random.key(0)))
    once()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        once()
        best = min(best, time.perf_counter() - t0)
    return mm, best / new


def train_floor(cfg: ModelConfig, tokens: int, repeats: int) -> float:
    """Matmul seconds of one forward + backward over ``tokens`` positions: per weight, y = x W, dx = dy W^T and
    dW = x^T dy, each timed at its own operand layout."""
    total = 0.0
    for k, n, c in dense_shapes(cfg):
        per = (time_matmul(tokens, k, n, repeats) + time_matmul(tokens, n, k, repeats, transpose="b")
               + time_matmul(k, tokens, n, repeats, transpose="a"))
        total += c * per
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="tiny,small")
    ap.add_argument("--rows", type=int, default=128, help="decode rows (prompts x samples) and train rows")
    ap.add_argument("--seq", type=int, default=152, help="train positions per row")
    ap.add_argument("--microbatches", default="1,32",
                    help="comma-separated gradient-accumulation splits of the train rows to bound")
    ap.add_argument("--repeats", type=int, default=50)
    args = ap.parse_args()
    presets = args.presets.split(",")
    splits = [int(k) for k in args.microbatches.split(",")]
    print(f"jax {jax.__version__} ({jax.devices()[0].platform}); decode {args.rows} rows; "
          f"train {args.rows} x {args.seq} positions")
    print("| preset | decode: matmul ms/step | decode ceiling tok/s (matmuls only) | 1-row decode ms/token |")
    print("|---|---|---|---|")
    for name in presets:
        mm, one_row = decode_floor(getattr(ModelConfig, name)(), args.rows, args.repeats)
        print(f"| {name} | {mm * 1e3:.2f} | {args.rows / mm:,.0f} | {one_row * 1e3:.2f} |", flush=True)
    print("| preset | micro-batches | train: matmul s/step | train ceiling tok/s (matmuls only) |")
    print("|---|---|---|---|")
    tokens = args.rows * args.seq
    for name in presets:
        for k in splits:
            micro = (args.rows // k) * args.seq  # positions per micro-batch (rows split as the step does)
            t = k * train_floor(getattr(ModelConfig, name)(), micro, max(3, args.repeats // 10))
            print(f"| {name} | {k} | {t:.2f} | {tokens / t:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
