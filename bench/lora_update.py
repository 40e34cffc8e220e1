"""The LoRA update against the full update, same model, same batch, interleaved rounds:

    python -m bench.lora_update [--model small|tiny|HF_DIR] [--rank 16] [--prompts 8] [--samples 8]
                                [--prompt-len 24] [--completion-len 64] [--repeats 3]

Both are ``passk_jax.rl.step`` train steps (one jitted program, old_logprobs="sampler", one mini-batch, all
rows computed) on the same parameters and batch; LoRA (rank ``--rank`` on every projection) differentiates
the adapters only, so it skips the base's weight gradients and its optimiser update but adds the adapters'
two thin matmuls per projection. Each runs once to compile, then ``--repeats`` rounds alternate the two; the
ratio is best against best, with the median of per-round ratios beside it.
"""
from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from bench.common import interleaved_times, median_ratio
from passk_jax import parallel
from passk_jax.models import hf, lora
from passk_jax.models import transformer as T
from passk_jax.rl import step as st
from passk_jax.rl.batch import Batch, batch_shardings


def make_batch(vocab: int, P: int, n: int, prompt_len: int, completion_len: int) -> Batch:
    rng = np.random.default_rng(0)
    R, S = P * n, prompt_len + completion_len
    tokens = rng.integers(1, vocab, (R, S)).astype(np.int32)
    token_mask = np.ones((R, S), bool)
    loss_mask = np.zeros((R, S), bool)
    for r in range(R):
        clen = rng.integers(completion_len // 2, completion_len + 1)
        token_mask[r, prompt_len + clen:] = False
        loss_mask[r, prompt_len: prompt_len + clen] = True
    positions = np.maximum(np.cumsum(token_mask, 1) - 1, 0).astype(np.int32)
    return Batch(tokens=tokens, positions=positions, token_mask=token_mask, loss_mask=loss_mask,
                 sampler_logprobs=np.where(loss_mask, -2.0, 0.0).astype(np.float32),
                 rewards=(rng.uniform(size=(P, n)) < 0.3).astype(np.float32), valid=np.ones((P, n), bool))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="small", help="a preset (tiny, small) or a Hugging Face directory")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=24)
    ap.add_argument("--completion-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    mesh = parallel.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    if args.model in ("tiny", "small"):
        cfg = getattr(T.ModelConfig, args.model)(scan_layers=False)
        graphdef, params = T.init(cfg, seed=0, mesh=mesh)
    else:
        model, cfg = hf.load_pretrained(args.model, mesh=mesh, scan_layers=False)
        graphdef, params = T.split(model)
    lcfg = lora.LoraConfig(rank=args.rank, alpha=2.0 * args.rank)
    lp = lora.LoraParams(params, lora.init_adapters(cfg, lcfg, jax.random.PRNGKey(1), mesh), lcfg.scale)
    step_cfg = st.StepConfig(estimator="passk_analytic", k=4, learning_rate=1e-5, old_logprobs="sampler")
    batch = jax.device_put(make_batch(cfg.vocab_size, args.prompts, args.samples, args.prompt_len,
                                      args.completion_len), batch_shardings(mesh))
    states, steps = {}, {}
    for name, p in (("full", params), ("lora", lp)):
        init, train_step = st.make_train_step(graphdef, step_cfg, mesh, p)
        states[name], steps[name] = init(p, jax.random.PRNGKey(3)), train_step
        t0 = time.perf_counter()
        states[name], m = train_step(states[name], batch)
        jax.block_until_ready(m)
        print(f"{name}: first step (compile + run) {time.perf_counter() - t0:.1f} s")

    def run(name):
        def fn():
            states[name], m = steps[name](states[name], batch)
            jax.block_until_ready(m)
        return fn

    times = interleaved_times({"full": run("full"), "lora": run("lora")}, args.repeats)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    n_adapt = sum(x.size for x in jax.tree.leaves(lp.adapters))
    print(f"model {args.model}: {n_params / 1e6:.1f}M parameters; LoRA rank {args.rank}: {n_adapt / 1e6:.2f}M "
          f"trainable ({100 * n_adapt / n_params:.1f}%); batch {args.prompts * args.samples} rows x "
          f"{args.prompt_len + args.completion_len}")
    for name, ts in times.items():
        print(f"  {name}: best {min(ts):.3f} s, rounds {', '.join(f'{t:.3f}' for t in ts)}")
    print(f"  full / lora: {min(times['full']) / min(times['lora']):.2f}x best-vs-best, "
          f"{median_ratio(times, 'full', 'lora'):.2f}x median of rounds")


if __name__ == "__main__":
    main()
