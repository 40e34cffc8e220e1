"""Top-p / top-k truncation per decode step: the sort-based definition vs the sampler's bisection.

    python -m bench.top_p [--rows 64,256] [--vocab 49152] [--repeats 5]

Both compute the same kept set (tests/test_sampling_ops.py checks equality); the sampler runs this once per
decode step on [rows, vocab] float32 logits. Timed jitted calls, interleaved, best and median ratio.
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from bench.common import interleaved_times, median_ratio
from passk_jax.sampling_ops import _cutoff_mask


def sorted_cutoff_mask(z, top_p, top_k):
    """The truncation set by sorting (the definition, and what the sampler computed before it searched by
    bisection): top-k threshold = the k-th largest value, top-p threshold = the value of the nucleus's last
    member in descending order. tests/test_sampling_ops.py checks the sampler's set equals this one."""
    vocab = z.shape[-1]
    zs = -jnp.sort(-z, axis=-1)
    k_on = (top_k > 0) & (top_k < vocab)
    kth = jnp.take(zs, jnp.clip(top_k - 1, 0, vocab - 1), axis=-1)[:, None]
    k_thresh = jnp.where(k_on, kth, -jnp.inf)
    zs = jnp.where(zs >= k_thresh, zs, -jnp.inf)
    ps = jax.nn.softmax(zs, axis=-1)
    mass_before = jnp.cumsum(ps, axis=-1) - ps
    n_keep = jnp.sum((mass_before < top_p) & (zs > -jnp.inf), axis=-1, keepdims=True)
    p_val = jnp.take_along_axis(zs, jnp.maximum(n_keep - 1, 0), axis=-1)
    return (z >= k_thresh) & (z >= jnp.where(top_p < 1.0, p_val, -jnp.inf))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", default="64,256")
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    print("| rows | vocab | knobs | sort (s) | bisection (s) | speed-up (best) | speed-up (median) |")
    print("|---|---|---|---|---|---|---|")
    for rows in map(int, args.rows.split(",")):
        z = jax.random.normal(jax.random.key(0), (rows, args.vocab)) * 3
        for top_p, top_k in ((0.95, 0), (1.0, 50)):
            fns = {name: (lambda f=jax.jit(f): f(z, jnp.float32(top_p), jnp.int32(top_k)).block_until_ready())
                   for name, f in (("sort", sorted_cutoff_mask), ("bisection", _cutoff_mask))}
            for fn in fns.values():
                fn()  # compile
            times = interleaved_times(fns, args.repeats)
            best = {k: min(v) for k, v in times.items()}
            print(f"| {rows} | {args.vocab} | top_p={top_p}, top_k={top_k} | {best['sort']:.3f} | "
                  f"{best['bisection']:.3f} | {best['sort'] / best['bisection']:.1f}x | "
                  f"{median_ratio(times, 'sort', 'bisection'):.1f}x |", flush=True)


if __name__ == "__main__":
    main()
