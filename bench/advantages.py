"""Benchmark (not a test): the jitted analytical Pass@k advantage against the official implementation's
approach, a per-prompt Python loop over ``scipy.special.comb`` written from the paper's Eq. 11-15.

    python -m bench.advantages [--k 4] [--repeats 200] [--all-cores]

For P in {128, 1024, 4096} prompts and n in {8, 32, 64} rollouts of binary rewards it prints the median
wall time of each (JAX: warm, one call including dispatch and ``block_until_ready``; loop: one full pass)
and their ratio, plus the largest difference between the two results. Both run in this process; by default
the process pins itself to one CPU core first (the loop is single-threaded, and on a shared machine the
XLA worker threads otherwise wait for a second core), ``--all-cores`` skips that.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np


def official_loop(rewards: np.ndarray, k: int) -> np.ndarray:
    """Per prompt: Rbar = 1 - C(N_neg, k)/C(N, k), sigma = sqrt(Rbar (1 - Rbar)), A_pos = (1 - Rbar)/sigma,
    A_neg = (1 - Rbar - C(N_neg-1, k-1)/C(N-1, k-1))/sigma (Eq. 11-15), float scipy comb."""
    from scipy.special import comb

    out = np.zeros_like(rewards)
    for i, group in enumerate(rewards):
        n = len(group)
        n_neg = n - int(group.sum())
        r_bar = 1 - comb(n_neg, k) / comb(n, k)
        sigma = np.sqrt(r_bar * (1 - r_bar))
        if sigma == 0:
            continue
        a_pos = (1 - r_bar) / sigma
        a_neg = (1 - r_bar - comb(n_neg - 1, k - 1) / comb(n - 1, k - 1)) / sigma
        out[i] = np.where(group > 0.5, a_pos, a_neg)
    return out


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=200, help="timed calls of the jitted kernel")
    parser.add_argument("--all-cores", action="store_true", help="do not pin the process to one core")
    args = parser.parse_args()
    if not args.all_cores and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})  # before jax creates its threads

    import jax
    import jax.numpy as jnp

    from passk_jax import advantages

    kernel = jax.jit(lambda r: advantages.passk_analytic(r, args.k))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"passk_analytic (jit) vs per-prompt scipy.special.comb loop | k={args.k} | jax {jax.__version__} "
          f"on {jax.devices()[0].platform} | {platform.processor() or platform.machine()} | {cores} core(s)")
    print(f"{'P':>6} {'n':>4} {'jax_us':>10} {'loop_ms':>10} {'speedup':>9} {'max|diff|':>10}")
    rng = np.random.default_rng(0)
    for p in (128, 1024, 4096):
        for n in (8, 32, 64):
            rewards = (rng.random((p, n)) < rng.random((p, 1))).astype(np.float32)
            device_rewards = jnp.asarray(rewards)
            ours = np.asarray(kernel(device_rewards).block_until_ready())
            jax_s = _median_time(lambda: kernel(device_rewards).block_until_ready(), args.repeats)
            loop_repeats = max(3, min(20, 16384 // p))  # about half a second of loop per configuration
            loop_s = _median_time(lambda: official_loop(rewards, args.k), loop_repeats)
            diff = np.abs(ours - official_loop(rewards, args.k)).max()
            print(f"{p:>6} {n:>4} {jax_s * 1e6:>10.1f} {loop_s * 1e3:>10.2f} {loop_s / jax_s:>8.0f}x "
                  f"{diff:>10.1e}")


if __name__ == "__main__":
    main()
