"""Supervised warm start on task demonstrations (e.g. the maze BFS paths), sharing the RL step's optimiser
(``passk_jax.optim.make_optimizer``) and sharding rules, so a model that has never seen the task starts RL from a
policy that solves some problems but not all (the regime where exploration matters).

Loss: token-mean cross-entropy over the response tokens (and the EOS) of each demonstration.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from passk_jax import parallel
from passk_jax.models.transformer import forward
from passk_jax.optim import OptimConfig, make_optimizer
from passk_jax.rl import losses
from passk_jax.tasks import Example, Task
from passk_jax.tokenizer import encode_prompt


def build_dataset(task: Task, tokenizer: Any, examples: Sequence[Example], *, demos_per_example: int,
                  max_new_tokens: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Demonstrations as right-padded sequences: tokens i32[N, L], loss_mask bool[N, L], token_mask bool[N, L].

    A demonstration whose response (plus EOS) does not fit in ``max_new_tokens`` is left out.
    """
    if not hasattr(task, "demonstrations"):
        raise ValueError(f"task {getattr(task, 'name', task)!r} has no demonstrations(); set sft.steps=0.")
    rows = []
    for ex in examples:
        prompt = encode_prompt(tokenizer, task.render(ex))
        for demo in task.demonstrations(ex, num=demos_per_example, seed=seed):
            answer = list(tokenizer(demo, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]
            if len(answer) <= max_new_tokens:
                rows.append((prompt, answer))
    if not rows:
        raise ValueError(f"no demonstration fits in max_new_tokens={max_new_tokens}; raise it.")
    length = max(len(p) + len(a) for p, a in rows)
    tokens = np.full((len(rows), length), tokenizer.pad_token_id, np.int32)
    loss_mask = np.zeros((len(rows), length), bool)
    token_mask = np.zeros((len(rows), length), bool)
    for i, (p, a) in enumerate(rows):
        tokens[i, :len(p) + len(a)] = p + a
        token_mask[i, :len(p) + len(a)] = True
        loss_mask[i, len(p):len(p) + len(a)] = True
    return tokens, loss_mask, token_mask


def make_sft_step(graphdef: Any, cfg: OptimConfig, mesh: jax.sharding.Mesh, params: Any
                  ) -> tuple[optax.GradientTransformation, Callable]:
    """``sft_step(params, opt_state, tokens, loss_mask, token_mask) -> (params, opt_state, loss)`` (jitted;
    the rows must already be placed with ``sft_rows_sharding(mesh)``, or be numpy on a single process)."""
    tx = make_optimizer(cfg)
    p_sh = parallel.param_shardings(params, mesh)
    o_sh = parallel.param_shardings(jax.eval_shape(tx.init, params), mesh)
    rows = sft_rows_sharding(mesh)
    rep = NamedSharding(mesh, PartitionSpec())

    def loss_fn(p, tokens, loss_mask, token_mask):
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        logits, _ = forward(graphdef, p, tokens, positions, token_mask)
        logp, _ = losses.shifted_logprobs_and_entropy(logits, tokens, 1.0)
        m = loss_mask.astype(jnp.float32)
        return -jnp.sum(logp * m) / jnp.maximum(jnp.sum(m), 1.0)

    def step(p, opt_state, tokens, loss_mask, token_mask):
        loss, grads = jax.value_and_grad(loss_fn)(p, tokens, loss_mask, token_mask)
        updates, opt_state = tx.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, loss

    jitted = jax.jit(step, in_shardings=(p_sh, o_sh, rows, rows, rows), out_shardings=(p_sh, o_sh, rep),
                     donate_argnums=(0, 1))
    return tx, jitted


def sft_rows_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Demonstration rows over ('data', 'fsdp')."""
    return parallel.logical_sharding(mesh, ("batch", None))


def train(graphdef: Any, params: Any, mesh: jax.sharding.Mesh, data: tuple[np.ndarray, ...], *, steps: int,
          batch_size: int, learning_rate: float, warmup_steps: int, seed: int,
          log: Callable[[int, float], None] | None = None, should_stop: Callable[[], bool] | None = None
          ) -> tuple[Any, list[float]]:
    """Run ``steps`` SFT updates over ``data`` (shuffled each epoch with ``seed``); returns (params, losses).

    ``should_stop`` is polled before every update (preemption): when it returns True training stops early.
    Every process holds the whole (small) dataset and draws the same batches; each places its own rows.
    """
    tokens, loss_mask, token_mask = data
    if batch_size > len(tokens):
        raise ValueError(f"sft.batch_size={batch_size} exceeds the {len(tokens)} demonstrations available.")
    cfg = OptimConfig(learning_rate=learning_rate, warmup_steps=warmup_steps, weight_decay=0.0,
                     lr_schedule="cosine", total_updates=max(steps, warmup_steps + 1), final_lr_ratio=0.1)
    tx, step = make_sft_step(graphdef, cfg, mesh, params)
    params = jax.device_put(jax.tree.map(jnp.copy, params), parallel.param_shardings(params, mesh))
    # placed like the step's outputs, so the second step does not trace and compile again
    o_sh = parallel.param_shardings(jax.eval_shape(tx.init, params), mesh)
    opt_state = jax.jit(tx.init, out_shardings=o_sh)(params)
    rng = np.random.default_rng(seed)
    order, pos, history = rng.permutation(len(tokens)), 0, []
    rows = sft_rows_sharding(mesh)
    for i in range(steps):
        if should_stop is not None and should_stop():
            break
        if pos + batch_size > len(order):
            order, pos = rng.permutation(len(tokens)), 0
        idx = order[pos:pos + batch_size]
        pos += batch_size
        batch = (tokens[idx], loss_mask[idx], token_mask[idx])
        if parallel.is_multiprocess():  # jit takes no host numpy for a sharding that spans processes
            batch = tuple(parallel.put_global(x, rows) for x in batch)
        params, opt_state, loss = step(params, opt_state, *batch)
        if log is not None and (i % 25 == 0 or i == steps - 1):
            history.append(float(loss))
            log(i, history[-1])
    return params, history


def cache_key(*parts: Any) -> str:
    """A short stable hash of JSON-able configuration pieces (the SFT cache directory name)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def cached_params(cache_dir: str, key: str, abstract_params: Any) -> Any | None:
    """Restore cached warm-start params, or None when absent/unreadable (every process must call it; all
    get the same answer: process 0's view of the cache decides, and a failed read anywhere means None)."""
    import orbax.checkpoint as ocp

    path = os.path.abspath(os.path.join(cache_dir, key))
    if not parallel.allgather(np.bool_(os.path.isdir(path)))[0]:
        return None
    try:
        with ocp.StandardCheckpointer() as ckpt:
            params = ckpt.restore(path, jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                abstract_params))
    except Exception:  # noqa: BLE001 - an unreadable cache entry is rebuilt
        params = None
    return None if parallel.process_any(params is None) else params


def cache_unwritable(cache_dir: str) -> str:
    """Why warm starts cannot be saved under ``cache_dir`` ("" when they can): process 0 creates it and writes
    a probe file; every process gets its answer. Checked before saving, because Orbax's background threads
    wait minutes for a directory it failed to create."""
    from passk_jax.run.workdir import unwritable

    return parallel.broadcast_text(unwritable(cache_dir) if jax.process_index() == 0 else "")


def save_cached_params(cache_dir: str, key: str, params: Any) -> None:
    """Save warm-start params under ``cache_dir/key`` (every process must call it; Orbax writes the shards,
    process 0 moves the finished directory into place). Check ``cache_unwritable`` first."""
    import orbax.checkpoint as ocp

    os.makedirs(cache_dir, exist_ok=True)
    path = os.path.abspath(os.path.join(cache_dir, key))
    stamp = int(parallel.allgather(np.int64(time.time() * 1e6))[0])  # one temporary name for all processes
    tmp = f"{path}.tmp{stamp}"
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp, params)
        ckpt.wait_until_finished()
    if jax.process_index() != 0:
        return
    if os.path.isdir(path):  # a concurrent run finished first: keep theirs
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        return
    os.replace(tmp, path)
