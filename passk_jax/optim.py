"""The optimiser shared by the RL step and the SFT warm start: gradient clipping -> AdamW with a warm-up
(+ optional cosine) learning-rate schedule, weight decay on weight matrices only.

``make_optimizer(cfg)`` takes an ``OptimConfig`` or any object with its fields (``rl.step.StepConfig`` has
them all), so this module imports neither ``rl`` nor ``sft``.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    learning_rate: float = 1e-6
    warmup_steps: int = 10
    lr_schedule: str = "constant"  # "constant" | "cosine"
    total_updates: int | None = None  # cosine horizon in optimiser updates
    final_lr_ratio: float = 0.0
    weight_decay: float = 0.01  # weight matrices only (see weight_decay_mask)
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    grad_clip_norm: float | None = 1.0


def learning_rate_schedule(cfg: OptimConfig) -> Callable[[jax.Array], jax.Array]:
    """lr * min(1, (u + 1) / warmup) x (1 or cosine decay to final_lr_ratio), u = optimiser update index."""
    def schedule(count: jax.Array) -> jax.Array:
        u = jnp.asarray(count, jnp.float32)
        warm = jnp.minimum(1.0, (u + 1.0) / max(cfg.warmup_steps, 1))
        if cfg.lr_schedule == "constant":
            return cfg.learning_rate * warm
        span = max(cfg.total_updates - cfg.warmup_steps, 1)
        progress = jnp.clip((u - cfg.warmup_steps) / span, 0.0, 1.0)
        cos = 0.5 * (1.0 + jnp.cos(math.pi * progress))
        return cfg.learning_rate * warm * (cfg.final_lr_ratio + (1.0 - cfg.final_lr_ratio) * cos)
    return schedule


def weight_decay_mask(params: Any) -> Any:
    """True for weight matrices; False for norms and biases (named ``*norm*`` / ``*bias*``: the decoder stacks
    layers, so a stacked norm scale is 2-D and ndim alone cannot tell) and for vectors."""
    def decay(path, x) -> bool:
        name = jax.tree_util.keystr(path).lower()
        return x.ndim >= 2 and "norm" not in name and "bias" not in name
    return jax.tree_util.tree_map_with_path(decay, params)


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    """clip_by_global_norm -> AdamW(schedule), weight decay on weight matrices only."""
    adamw = optax.adamw(learning_rate_schedule(cfg), b1=cfg.adam_b1, b2=cfg.adam_b2, eps=cfg.adam_eps,
                        weight_decay=cfg.weight_decay, mask=weight_decay_mask)
    if cfg.grad_clip_norm is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), adamw)
