"""Tiny model and synthetic group-rollout batches shared by the rl tests."""
import functools

import jax
import numpy as np
from flax import nnx

from passk_jax.models import transformer as T
from passk_jax.rl.batch import Batch

CFG = T.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                    num_kv_heads=1, head_dim=16, rope_theta=10000.0, family="qwen2", attention_bias=True)


@functools.lru_cache(maxsize=None)
def tiny_model(seed: int = 0, cfg: T.ModelConfig = CFG):
    """(graphdef, params) of the decoder (cached: the step copies parameters, never donates these)."""
    graphdef, params = T.split(T.Transformer(cfg, rngs=nnx.Rngs(seed)))
    # random (not unit / zero) norms and biases, so that every parameter matters
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    leaves = [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    return graphdef, jax.tree.unflatten(tree, leaves)


def make_batch(P: int = 8, n: int = 4, prompt_len: int = 5, completion_len: int = 7, seed: int = 0,
               vocab: int = CFG.vocab_size, shared_prompts: bool = False) -> Batch:
    """Left-padded prompts + right-padded completions, a few invalid rollouts, mixed reward groups; the rows
    of a group hold different prompt tokens unless ``shared_prompts`` (as a rollout's do)."""
    rng = np.random.default_rng(seed)
    R, S = P * n, prompt_len + completion_len
    tokens = rng.integers(0, vocab, (R, S)).astype(np.int32)
    if shared_prompts:
        tokens[:, :prompt_len] = tokens[(np.arange(R) // n) * n, :prompt_len]
    token_mask = np.ones((R, S), bool)
    loss_mask = np.zeros((R, S), bool)
    for r in range(R):
        plen = 2 + (r // n) % (prompt_len - 1)          # same prompt length within a group
        clen = 1 + rng.integers(0, completion_len)
        token_mask[r, : prompt_len - plen] = False
        token_mask[r, prompt_len + clen:] = False
        loss_mask[r, prompt_len: prompt_len + clen] = True
    tokens = np.where(token_mask, tokens, 0).astype(np.int32)
    positions = np.maximum(np.cumsum(token_mask, 1) - 1, 0).astype(np.int32)
    sampler_lp = np.where(loss_mask, -rng.uniform(1.0, 6.0, (R, S)), 0.0).astype(np.float32)
    rewards = (rng.uniform(size=(P, n)) < 0.4).astype(np.float32)
    rewards[0] = 0.0
    rewards[1] = 1.0
    valid = np.ones((P, n), bool)
    valid[2, 1] = valid[5, 3] = False
    return Batch(tokens, positions, token_mask, loss_mask, sampler_lp, rewards, valid)


class ToyLM(nnx.Module):
    """A causal LM that compiles in well under a second, with the transformer's calling convention and
    logical-axis metadata (so parameters and optimiser state shard over fsdp / tensor like the real model):
    logits_t = (tanh(prefix_mean_t W) + e_t) H + b, prefix_mean_t the mean embedding of tokens <= t."""

    def __init__(self, vocab: int = 64, dim: int = 32, seed: int = 0):
        k = jax.random.split(jax.random.key(seed), 3)
        param = lambda v, axes: nnx.Param(v, out_sharding=axes, eager_sharding=False)  # noqa: E731
        self.embed = param(0.5 * jax.random.normal(k[0], (vocab, dim)), ("vocab", "embed"))
        self.w = param(jax.random.normal(k[1], (dim, dim)) / dim**0.5, ("embed", "mlp"))
        self.head = param(jax.random.normal(k[2], (dim, vocab)) / dim**0.5, ("embed", "vocab"))
        self.bias = param(0.1 * jax.random.normal(k[0], (vocab,)), ("vocab",))

    def __call__(self, tokens, positions, token_mask, cache=None):
        m = token_mask.astype(jax.numpy.float32)[..., None]
        x = self.embed[...][tokens] * m
        prefix = jax.numpy.cumsum(x, axis=1) / jax.numpy.maximum(jax.numpy.cumsum(m, axis=1), 1.0)
        h = jax.numpy.tanh(prefix @ self.w[...]) + x
        return h @ self.head[...] + self.bias[...], cache


def toy_model(seed: int = 0, vocab: int = CFG.vocab_size):
    return nnx.split(ToyLM(vocab=vocab, seed=seed), nnx.Param)
