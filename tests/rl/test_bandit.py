"""Learning sanity check: a synthetic bandit-like task on the tiny decoder, under Pass@1 and Pass@k advantages.

Four fixed prompts; a completion of 4 tokens (vocabulary 16) earns reward 1 iff it contains both tokens of
its prompt's target set (a uniform policy would succeed 4% of the time; the random initial one ~15%). Completions are sampled inside the test
with ``jax.random.categorical`` from the current policy; the step uses those sampler log-probabilities.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from passk_jax import parallel
from passk_jax.models import transformer as T
from passk_jax.rl import step as st
from passk_jax.rl.batch import Batch
from tests.rl.helpers import CFG, tiny_model

P, N, PROMPT, COMPLETION, VOCAB = 4, 8, 3, 4, 16
PROMPTS = np.array([[1, 2 + p, 1] for p in range(P)], np.int32)
TARGETS = np.array([[4 + p, 12 - p] for p in range(P)], np.int32)
STEPS = 150


@jax.jit(static_argnums=0)
def rollout(graphdef, params, key):
    """Sample N completions per prompt from the policy; returns a step Batch (rewards computed here)."""
    R, S = P * N, PROMPT + COMPLETION
    tokens = jnp.zeros((R, S), jnp.int32).at[:, :PROMPT].set(jnp.repeat(jnp.asarray(PROMPTS), N, axis=0))
    positions = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (R, S))
    mask = jnp.ones((R, S), bool)  # causal attention: the not-yet-sampled zeros are never attended

    def body(t, carry):
        tokens, lps = carry
        logits, _ = T.forward(graphdef, params, tokens, positions, mask)
        logits = jax.lax.dynamic_index_in_dim(logits, PROMPT + t - 1, axis=1, keepdims=False)
        tok = jax.random.categorical(jax.random.fold_in(key, t), logits)
        lp = jnp.take_along_axis(jax.nn.log_softmax(logits), tok[:, None], axis=-1)[:, 0]
        return tokens.at[:, PROMPT + t].set(tok), lps.at[:, PROMPT + t].set(lp)

    tokens, lps = jax.lax.fori_loop(0, COMPLETION, body, (tokens, jnp.zeros((R, S), jnp.float32)))
    targets = jnp.repeat(jnp.asarray(TARGETS), N, axis=0)
    hit = (tokens[:, PROMPT:, None] == targets[:, None, :]).any(axis=1).all(axis=-1)
    loss_mask = jnp.arange(S)[None, :] >= PROMPT
    return Batch(tokens, positions, mask, jnp.broadcast_to(loss_mask, (R, S)), lps,
                    hit.astype(jnp.float32).reshape(P, N), jnp.ones((P, N), bool))


def _train(estimator: str, k: int) -> dict[str, np.ndarray]:
    graphdef, params = tiny_model(seed=0, cfg=dataclasses.replace(CFG, vocab_size=VOCAB))
    cfg = st.StepConfig(estimator=estimator, k=k, learning_rate=5e-3, warmup_steps=5, weight_decay=0.0,
                        num_minibatches=2, old_logprobs="sampler")
    mesh = parallel.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    init, train_step = st.make_train_step(graphdef, cfg, mesh, params)
    state = init(params)
    key = jax.random.PRNGKey(0)
    history = []
    for i in range(STEPS):
        batch = rollout(graphdef, state.params, jax.random.fold_in(key, i))
        state, metrics = train_step(state, batch)
        history.append({name: metrics[name] for name in ("reward_mean", "rollout_pass@k", "entropy")})
    assert train_step._cache_size() == 1
    return {name: np.asarray([h[name] for h in jax.device_get(history)]) for name in history[0]}


def test_reward_rises_under_pass1_and_passk():
    pass1, passk = _train("grpo", 1), _train("passk_analytic", 4)
    early, late = slice(0, 10), slice(-20, None)
    for h in (pass1, passk):
        assert h["reward_mean"][early].mean() < 0.25
        assert h["reward_mean"][late].mean() > h["reward_mean"][early].mean() + 0.3
    assert passk["rollout_pass@k"][late].mean() > 0.7 > passk["rollout_pass@k"][early].mean() + 0.2
    # the paper's observation in miniature: Pass@1 training collapses the entropy, Pass@k training keeps it
    assert passk["entropy"][late].mean() > 2 * pass1["entropy"][late].mean()
