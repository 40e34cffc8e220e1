"""The train step's input: group rollouts of P prompts x n samples as arrays, and their shardings."""
from __future__ import annotations

from typing import NamedTuple

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from passk_jax import parallel

BATCH = ("batch", None)  # logical axes of a row array [R, S]: rows over ('data', 'fsdp')


class Batch(NamedTuple):
    """Group rollouts of P prompts x n samples; R = P * n rows, prompt-major (row = p * n + j)."""

    tokens: jax.Array            # i32[R, S] prompt (left-padded) + completion (right-padded)
    positions: jax.Array         # i32[R, S]
    token_mask: jax.Array        # bool[R, S] real tokens (attention)
    loss_mask: jax.Array         # bool[R, S] completion tokens (the ones that are trained)
    sampler_logprobs: jax.Array  # f32[R, S] log-prob of tokens[r, s] under the sampler; 0 off loss_mask
    #                              (old_logprobs="sampler" needs them at the trained policy: same temperature,
    #                              no top-p / top-k)
    rewards: jax.Array           # f32[P, n]
    valid: jax.Array             # bool[P, n] rollout validity (invalid rows train nothing, count nowhere)


def batch_shardings(mesh: Mesh) -> Batch:
    """Rows over ('data', 'fsdp'); rewards / valid (tiny) replicated."""
    rows = parallel.logical_sharding(mesh, BATCH)
    rep = NamedSharding(mesh, PartitionSpec())
    return Batch(rows, rows, rows, rows, rows, rep, rep)
