"""The Tunix side of `python -m bench.tunix` (issue 9); runs in Tunix's own virtual environment.

    <tunix venv>/bin/python bench/tunix_child.py --workdir DIR --out FILE.json

This file imports only Tunix, JAX, Flax, optax and numpy (never passk_jax: it is not installed in that
environment). The driver (`bench/tunix.py`) leaves in DIR:

- ``model/``: a Hugging Face Qwen2 checkpoint (config.json + model.safetensors) with the random weights that
  the passk_jax side loads too;
- ``batch.npz``: ``prompts`` (i32[P, prompt_len], left-padded with 0) and ``prompt_lengths``, and the update
  batch ``tokens`` (i32[R, prompt_len + new]: left-padded prompt, right-padded completion, pad id 0),
  ``loss_mask``, ``old_logprobs`` (f32[R, S], the log-prob of token t at column t) and ``rewards`` (f32[P, n]);
- ``spec.json``: the model shape, the sizes, the optimizer and loss settings, ``repeats``.

What is timed (every phase: one warm-up call, which compiles, then the best of ``repeats`` calls; each
call ends with the results on the host or `jax.block_until_ready`):

- ``sampler``: `RLCluster.generate` (the GRPO learner's rollout path: the "vanilla" rollout engine, i.e.
  `tunix.generate.sampler.Sampler`) on the P prompts each repeated n times (the learner repeats prompts the
  same way), ``max_prompt_length`` = prompt_len, KV cache = prompt_len + new slots (the least it accepts),
  temperature 1, ``top_p=1.0`` (without top_p Tunix decodes greedily), no top-k; the tokenizer's EOS id is
  outside the vocabulary, so every row decodes exactly ``new`` tokens. tokens/s = P n new / time.
- ``update``: the actor trainer's jitted train step (`PeftTrainer._train_step` under `nnx.jit`, as
  `GRPOLearner` configures it: its ``grpo`` policy loss, value_and_grad, `optimizer.update`) on the
  driver's batch, with ``old_per_token_logps`` = the batch's old log-probs (as ours uses the sampler's) and
  the learner's GRPO advantages of the batch's rewards. tokens/s = R S / time (every position of every row).
- ``rl_step``: `GRPOLearner._generate_and_compute_advantage` (rollout through `RLCluster.generate`, the
  reward function on the decoded completions, GRPO advantages, the `TrainExample`) followed by the same
  jitted train step; i.e. one iteration of the learner's loop without its data-queue, metrics-logging and
  checkpoint machinery. Like the learner with ``num_iterations=1`` it passes no old log-probs (the loss then
  uses the stop-gradient of the current ones). tokens/s = R S / total.
"""
from __future__ import annotations

import argparse
import json
import warnings
import platform
import sys
import time
from importlib import metadata
from pathlib import Path

# This script lives next to bench/tunix.py, which would shadow the `tunix` package: drop its directory from
# the import path (python puts the script's directory first).
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]


class IntTokenizer:
    """Token ids written as decimal numbers separated by spaces (Tunix's sampler takes strings).

    No BOS; EOS = ``vocab_size`` (never sampled, so no row stops early); pad id 0 (the prompts never contain 0).
    """

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def encode(self, text: str, **_) -> list[int]:
        return [int(t) for t in text.split()]

    def decode(self, ids, **_) -> str:
        return " ".join(str(int(i)) for i in ids)

    def bos_id(self):
        return None

    def eos_id(self) -> int:
        return self.vocab_size

    def pad_id(self) -> int:
        return 0


def synthetic_reward(prompts, completions, **_) -> list[float]:
    """Same rule as bench/gpu.py: 1 iff more than half of the completion's tokens are even ids."""
    out = []
    for text in completions:
        ids = [int(t) for t in text.split()]
        out.append(float(2 * sum(1 for t in ids if t % 2 == 0) > len(ids)))
    return out


def best_of(fn, repeats: int) -> tuple[float, float, object]:
    """(first call seconds, fastest of `repeats` further calls, last result)."""
    t0 = time.perf_counter()
    result = fn()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return first, min(times), result


def versions() -> dict:
    out = {"python": platform.python_version()}
    for dist in ("google-tunix", "jax", "jaxlib", "flax", "optax", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def run(workdir: Path) -> dict:
    warnings.filterwarnings("ignore", category=DeprecationWarning)  # `with mesh:`, used inside Tunix too
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx
    from tunix.models.qwen2 import model as qwen2_model
    from tunix.models.qwen2 import params as qwen2_params
    from tunix.rl import algo_core
    from tunix.rl import rl_cluster as rlc
    from tunix.rl.grpo import grpo_learner
    from tunix.rl.rollout import base_rollout
    from tunix.sft import sharding_utils

    spec = json.loads((workdir / "spec.json").read_text())
    m, s = spec["model"], spec["sizes"]
    P, n, plen, new, repeats = s["prompts"], s["samples"], s["prompt_len"], s["new_tokens"], spec["repeats"]
    R, S = P * n, plen + new
    data = np.load(workdir / "batch.npz")

    auto = jax.sharding.AxisType.Auto  # (jax.make_mesh now defaults to Explicit axes, which Tunix's Qwen2 rejects)
    mesh = jax.make_mesh((1, 1), ("fsdp", "tp"), axis_types=(auto, auto), devices=jax.devices()[:1])
    cfg = qwen2_model.ModelConfig(
        num_layers=m["num_layers"], vocab_size=m["vocab_size"], embed_dim=m["hidden_size"],
        hidden_dim=m["intermediate_size"], num_heads=m["num_heads"], head_dim=m["head_dim"],
        num_kv_heads=m["num_kv_heads"], rope_theta=m["rope_theta"], norm_eps=m["rms_norm_eps"],
        use_tied_embedding=m["tie_word_embeddings"], dtype=jnp.float32, param_dtype=jnp.float32)
    with mesh:  # noqa: the loader places each weight on this mesh
        model = qwen2_params.create_model_from_safe_tensors(str(workdir / "model"), cfg, mesh, dtype=jnp.float32)

    opt = spec["optimizer"]
    optimizer = optax.chain(optax.clip_by_global_norm(opt["grad_clip_norm"]),
                            optax.adamw(opt["learning_rate"], weight_decay=opt["weight_decay"]))
    rollout_config = base_rollout.RolloutConfig(
        max_tokens_to_generate=new, max_prompt_length=plen, kv_cache_size=plen + new, temperature=1.0,
        top_p=1.0, top_k=None)
    cluster = rlc.RLCluster(
        actor=model, reference=None, tokenizer=IntTokenizer(m["vocab_size"]),
        cluster_config=rlc.ClusterConfig(
            role_to_mesh={rlc.Role.ACTOR: mesh, rlc.Role.REFERENCE: mesh, rlc.Role.ROLLOUT: mesh},
            rollout_engine="vanilla", offload_to_cpu=False,
            training_config=rlc.RLTrainingConfig(actor_optimizer=optimizer, eval_every_n_steps=10**9,
                                                 max_steps=10**9),
            rollout_config=rollout_config))
    loss = spec["loss"]
    algo = grpo_learner.GRPOConfig(num_generations=n, num_iterations=1, beta=0.0, epsilon=loss["eps_low"],
                                   loss_agg_mode="token-mean")
    algo.epsilon_high = loss["eps_high"]  # read by the grpo loss via hasattr (DAPO-style clip-higher)
    learner = grpo_learner.GRPOLearner(cluster, algo, reward_fns=synthetic_reward)
    # what `RLLearner.train` sets before its loop (defaults: the whole batch of prompts in one call)
    learner._rollout_micro_batch_size = P
    learner._compute_logps_micro_batch_size = P

    prompt_texts = [" ".join(str(int(t)) for t in row[plen - length:])
                    for row, length in zip(data["prompts"], data["prompt_lengths"])]
    repeated = np.repeat(np.array(prompt_texts, dtype=object), n)  # as RLLearner._prepare_data: [P] -> [P n]
    trainer = cluster.actor_trainer
    # the trainer's train() runs inside the actor mesh context (RLCluster.update_actor); so do its step here,
    # else the optimizer state is not pre-sharded and the step compiles twice
    actor_ctx = lambda: cluster._get_mesh_and_logical_axis_rules_cm(rlc.Role.ACTOR)  # noqa: E731
    with actor_ctx():
        train_step, _ = trainer.jit_train_and_eval_step(skip_jit=False, cache_nnx_graph=True)
    axis = trainer.config.data_sharding_axis
    results: dict = {}

    # (a) sampler
    def sample():
        out = cluster.generate(prompts=list(repeated), mode=rlc.Mode.TRAIN,
                               micro_batch_size=learner._rollout_micro_batch_size * n)
        assert len(out.tokens) == R and min(len(t) for t in out.tokens) == new, "rows stopped early"
        return out

    first, t, _ = best_of(sample, repeats)  # RLCluster.generate enters the rollout mesh itself
    results["sampler"] = dict(tokens_per_s=R * new / t, time_s=t, first_call_s=first, rows=R, new_tokens=new)

    # (b) one GRPO update on the driver's batch
    tokens, loss_mask = data["tokens"], data["loss_mask"]
    adv = algo_core.compute_advantages(data["rewards"].reshape(-1).astype(np.float32), n)
    example = grpo_learner.TrainExample(
        prompt_ids=jnp.asarray(tokens[:, :plen]), prompt_mask=jnp.asarray(tokens[:, :plen] != 0),
        completion_ids=jnp.asarray(tokens[:, plen:]), completion_mask=jnp.asarray(loss_mask[:, plen:]),
        advantages=jnp.asarray(adv, jnp.float32), ref_per_token_logps=None,
        old_per_token_logps=jnp.asarray(data["old_logprobs"][:, plen:]))

    def update(ex=example):
        ex = sharding_utils.shard_input(trainer._prepare_inputs(ex), axis)
        loss_value, aux, grad_norm = train_step(ex)
        jax.block_until_ready((loss_value, grad_norm, nnx.state(trainer.model, nnx.Param)))
        return float(loss_value)

    with actor_ctx():
        first, t, loss_value = best_of(update, repeats)
    results["update"] = dict(tokens_per_s=R * S / t, time_s=t, first_call_s=first, rows=R, seq=S,
                             loss=loss_value)

    # (c) one full RL step: rollout -> reward -> advantages -> update
    split: dict = {}

    def rl_step():
        t0 = time.perf_counter()
        ex = learner._generate_and_compute_advantage({"prompts": repeated}, rlc.Mode.TRAIN)
        jax.block_until_ready(ex.advantages)
        t1 = time.perf_counter()
        ex = sharding_utils.shard_input(trainer._prepare_inputs(ex), axis)
        loss_value, aux, grad_norm = train_step(ex)
        jax.block_until_ready((loss_value, grad_norm, nnx.state(trainer.model, nnx.Param)))
        t2 = time.perf_counter()
        assert ex.completion_ids.shape == (R, new) and ex.prompt_ids.shape == (R, plen)
        split.setdefault("runs", []).append(dict(rollout_reward_s=t1 - t0, train_s=t2 - t1))
        return float(np.mean(np.asarray(ex.advantages) != 0))

    with actor_ctx():
        first, t, nonzero = best_of(rl_step, repeats)
    best = min(split["runs"][1:], key=lambda r: r["rollout_reward_s"] + r["train_s"])
    results["rl_step"] = dict(tokens_per_s=R * S / t, time_s=t, first_call_s=first, rows=R, seq=S,
                              nonzero_advantage=nonzero, **best)
    return dict(status="ok", phases=results, versions=versions(), platform=jax.devices()[0].platform,
                device=jax.devices()[0].device_kind)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args(argv)
    result = run(args.workdir)
    args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
