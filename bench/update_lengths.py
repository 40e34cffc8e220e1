"""The packed update (``step.packing="lengths"``) against the padded one (``"off"``) on long-tailed lengths.

    python -m bench.update_lengths [--preset small] [--prompts 16] [--samples 8] [--prompt-len 32]
                                   [--max-new-tokens 256] [--microbatches 4] [--repeats 3]
                                   [--old-logprobs recompute] [--length-buckets 4]

One batch: P prompts x n samples, prompts of ``prompt-len`` tokens, response lengths log-normal with a mean of
about a fifth of ``max-new-tokens`` (clipped to [1, max-new-tokens]), and half of the prompts with all-equal
rewards, so that their Pass@k advantages are 0. Both updates start from the same state; each runs once to
compile, then ``repeats`` rounds run both in turn (the CPU's load drifts). Printed: wall time (best and
median ratio), the compiled FLOPs of everything each update runs (XLA cost analysis; the packed update's sum
over the micro-batch programs it calls), the rows and positions it computes, and the relative parameter
difference after one update.
"""
from __future__ import annotations

import argparse
import dataclasses

import jax
import numpy as np
from flax import nnx

from bench.common import interleaved_times, median_ratio
from passk_jax import parallel
from passk_jax.models import transformer as T
from passk_jax.rl import packed_step, step as st
from passk_jax.rl.batch import Batch


def make_batch(P: int, n: int, prompt_len: int, max_new: int, vocab: int, seed: int = 0) -> Batch:
    rng = np.random.default_rng(seed)
    R, S = P * n, prompt_len + max_new
    mean = max_new / 5
    sigma = 1.0
    lengths = np.clip(np.round(rng.lognormal(np.log(mean) - sigma**2 / 2, sigma, R)), 1, max_new).astype(int)
    tokens = rng.integers(1, vocab, (R, S)).astype(np.int32)
    token_mask = np.zeros((R, S), bool)
    loss_mask = np.zeros((R, S), bool)
    for r in range(R):
        token_mask[r, :prompt_len + lengths[r]] = True
        loss_mask[r, prompt_len:prompt_len + lengths[r]] = True
    tokens = np.where(token_mask, tokens, 0).astype(np.int32)
    positions = np.maximum(np.cumsum(token_mask, 1) - 1, 0).astype(np.int32)
    sampler = np.where(loss_mask, -rng.uniform(0.5, 4.0, (R, S)), 0.0).astype(np.float32)
    rewards = (rng.uniform(size=(P, n)) < 0.3).astype(np.float32)
    rewards[: P // 2] = (np.arange(P // 2) % 2)[:, None]  # half the prompts: all-0 or all-1, advantage 0
    return Batch(tokens, positions, token_mask, loss_mask, sampler, rewards, np.ones((P, n), bool))


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
                        if hasattr(x, "shape") else x, tree)


def count_flops(mcfg, base, batch, mesh) -> dict[str, float]:
    """Compiled FLOPs of one padded and one packed update of ``batch`` (the packed one: the sum over the
    programs its host loop calls, each lowered as called)."""
    mcfg = dataclasses.replace(mcfg, attention="plain")
    graphdef, params = T.split(T.Transformer(mcfg, rngs=nnx.Rngs(0)))
    cfg = dataclasses.replace(base, num_microbatches=1, num_minibatches=1)
    init, padded = st.make_train_step(graphdef, dataclasses.replace(cfg, packing="off", old_logprobs="sampler"),
                                      mesh, params)
    flops = {"padded": padded.lower(_abstract(init(params)), _abstract(batch)).compile().cost_analysis()["flops"]}
    if base.old_logprobs == "recompute":  # the padded update's old-policy forward, lowered on its own
        fwd = jax.jit(lambda p, b: st.policy_logprobs(graphdef, p, b.tokens, b.positions, b.token_mask))
        flops["padded"] += fwd.lower(params, batch).compile().cost_analysis()["flops"]
    init, packed = packed_step.make_packed_train_step(graphdef, dataclasses.replace(base, packing="lengths"),
                                                      mesh, params)
    progs, calls = packed.programs, []
    for name in ("prelim", "layout", "old", "late_advantages", "set_adv", "zeros", "grad", "apply", "finish"):
        fn = getattr(progs, name)

        def record(*a, _fn=fn, **k):
            calls.append((_fn, _abstract(a), k))
            return _fn(*a, **k)
        setattr(progs, name, record)
    packed(init(params), batch)
    cost: dict = {}
    total = 0.0
    for fn, a, k in calls:
        key = repr((id(fn), jax.tree.map(lambda x: (x.shape, str(x.dtype)) if hasattr(x, "shape") else x, a),
                    sorted(k.items())))
        if key not in cost:
            cost[key] = fn.lower(*a, **k).compile().cost_analysis().get("flops", 0.0)
        total += cost[key]
    flops["packed"] = total
    return flops


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--microbatches", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--old-logprobs", default="recompute", choices=("recompute", "sampler"))
    p.add_argument("--length-buckets", type=int, default=st.StepConfig.length_buckets)
    args = p.parse_args(argv)
    jax.config.update("jax_default_matmul_precision", "highest")
    mcfg = getattr(T.ModelConfig, args.preset)()
    graphdef, params = T.split(T.Transformer(mcfg, rngs=nnx.Rngs(0)))
    mesh = parallel.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    base = st.StepConfig(estimator="passk_analytic", k=4, learning_rate=1e-5, warmup_steps=0,
                         num_microbatches=args.microbatches, old_logprobs=args.old_logprobs,
                         length_buckets=args.length_buckets)
    batch = make_batch(args.prompts, args.samples, args.prompt_len, args.max_new_tokens, mcfg.vocab_size)
    steps = {}
    for mode, make in (("padded", st.make_train_step), ("packed", packed_step.make_packed_train_step)):
        init, fn = make(graphdef, dataclasses.replace(base, packing="off" if mode == "padded" else "lengths"),
                        mesh, params)
        steps[mode] = (init, fn)

    # FLOPs (XLA cost analysis counts a loop body once): both updates lowered with plain attention and, for
    # the padded one, one micro-batch and no old-policy loop, so that every FLOP is in straight-line code
    flops = count_flops(mcfg, base, batch, mesh)

    # parameters after one update, from the same state
    after = {}
    for mode, (init, fn) in steps.items():
        s, _ = fn(init(params), batch)
        after[mode] = jax.device_get(s.params)
    flat = lambda t: np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)])  # noqa: E731
    a, b, p0 = flat(after["padded"]), flat(after["packed"]), flat(jax.device_get(params))
    rel = float(np.linalg.norm(b - a) / np.linalg.norm(a))
    rel_update = float(np.linalg.norm(b - a) / np.linalg.norm(a - p0))
    _, metrics = steps["packed"][1](steps["packed"][0](params), batch)

    def runner(mode):
        init, fn = steps[mode]
        box = [init(params)]

        def go():
            box[0], m = fn(box[0], batch)
            jax.block_until_ready(m)
        go()  # compile / warm
        return go
    fns = {mode: runner(mode) for mode in steps}
    times = interleaved_times(fns, args.repeats)
    out = {"rows": args.prompts * args.samples, "width": args.prompt_len + args.max_new_tokens,
           "trained_tokens": int(batch.loss_mask.sum()),
           "rows_computed_frac": float(metrics["rows_computed_frac"]),
           "positions_frac": float(metrics["positions_frac"]), "microbatches": float(metrics["microbatches"]),
           "flops_padded": flops["padded"], "flops_packed": flops["packed"],
           "flops_ratio": flops["padded"] / flops["packed"],
           "time_padded_best": min(times["padded"]), "time_packed_best": min(times["packed"]),
           "time_ratio_best": min(times["padded"]) / min(times["packed"]),
           "time_ratio_median": median_ratio(times, "padded", "packed"),
           "param_rel_diff": rel, "update_rel_diff": rel_update}
    for k, v in out.items():
        print(f"{k:22s} {v:.4g}" if isinstance(v, float) else f"{k:22s} {v}")
    return out


if __name__ == "__main__":
    main()
