"""Held-out evaluation: unbiased pass@k and pass^k for k = 1, 2, 4, ..., n_eval, overall and per data_source.

Sampling follows the paper's evaluation settings (temperature 1.0, top-p 0.95, n_eval samples per
prompt); pass@k is the unbiased estimator of ``passk_jax.metrics.pass_at_k`` computed from the per-prompt
number of correct samples (never bootstrapped with replacement). Greedy accuracy is one temperature-0
sample per prompt. A response counts as correct when its reward passes (``metrics.is_pass``: ``>= threshold``).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import numpy as np

from passk_jax import metrics
from passk_jax.rl import rollout
from passk_jax.tasks import Example


def powers_of_two(n: int) -> list[int]:
    """1, 2, 4, ..., up to n, and n itself."""
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    return ks + [n]


def summarize(correct: np.ndarray, sources: Sequence[str], rewards: np.ndarray, texts: Sequence[Any],
              prefix: str = "eval/") -> dict[str, float]:
    """pass@k and pass^k (all k samples correct; mean and standard error over prompts) for k in
    powers_of_two(n), overall and per source, plus the mean reward and the number of distinct wrong answers per prompt (the paper's diversity).

    ``texts`` only need to compare equal when the responses do (``Rollouts.text_keys()``)."""
    num_prompts, n = correct.shape
    ks = powers_of_two(n)
    out: dict[str, float] = {f"{prefix}reward_mean": float(rewards.mean())}
    groups = {"all": np.arange(num_prompts)}
    for src in sorted(set(sources)):
        groups[src] = np.array([i for i, s in enumerate(sources) if s == src])
    for name, idx in groups.items():
        tag = "" if name == "all" else f"{name}/"
        c = correct[idx].sum(1)
        for k in ks:
            for metric, fn in (("pass@", metrics.pass_at_k), ("pass^", metrics.pass_hat_k)):
                per_prompt = np.asarray(fn(np.full_like(c, n), c, k), np.float64)
                out[f"{prefix}{tag}{metric}{k}"] = float(per_prompt.mean())
                if name == "all":
                    out[f"{prefix}{metric}{k}_stderr"] = float(per_prompt.std(ddof=1) / np.sqrt(len(idx))
                                                               if len(idx) > 1 else 0.0)
    out[f"{prefix}distinct_wrong_per_prompt"] = float(distinct_answers(correct, texts)[0].mean())
    return out


def distinct_answers(correct: np.ndarray, texts: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    """Per prompt, the number of distinct wrong responses and of distinct responses (i32[P] each); the
    rows of prompt i are ``texts[i * n:(i + 1) * n]``."""
    num_prompts, n = correct.shape
    rows = [[texts[i * n + j] for j in range(n)] for i in range(num_prompts)]
    wrong = [len({t for t, ok in zip(row, correct[i]) if not ok}) for i, row in enumerate(rows)]
    return np.asarray(wrong, np.int32), np.asarray([len(set(row)) for row in rows], np.int32)


def evaluate(env: rollout.Env, params: Any, examples: Sequence[Example], *, num_samples: int,
             max_new_tokens: int, key: jax.Array, temperature: float = 1.0, top_p: float = 0.95, greedy: bool = True, batch_prompts: int = 64,
             threshold: float = metrics.PASS_THRESHOLD, prefix: str = "eval/",
             on_rollouts: Callable[[rollout.Rollouts], None] | None = None
             ) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Sample and score the held-out examples, ``batch_prompts`` per sampler call; returns (metrics,
    per-prompt results): ``correct`` (i32[P], correct samples of each prompt out of ``num_samples``),
    ``distinct_wrong`` and ``distinct`` (i32[P], distinct wrong / distinct responses), ``greedy`` (i32[P],
    1 when the greedy response is correct; only with ``greedy``). With several processes each scores its
    own rows and every process returns the same results (see ``rollout.generate``). ``on_rollouts``: called
    with the sampled (not greedy) rollouts of all prompts, e.g. to record samples."""
    params = env.sampler.prepare(params)  # one decode copy for every chunk
    parts = []
    for i, start in enumerate(range(0, len(examples), batch_prompts)):
        parts.append(rollout.generate(
            env, params, examples[start:start + batch_prompts],
            num_samples=num_samples, max_new_tokens=max_new_tokens, key=jax.random.fold_in(key, i),
            temperature=temperature, top_p=top_p, phase="eval"))
    r = rollout.Rollouts.concat(parts)
    if on_rollouts is not None:
        on_rollouts(r)
    correct = metrics.is_pass(r.rewards, threshold)
    out = summarize(correct, [ex.data_source for ex in examples], r.rewards, r.text_keys(), prefix)
    out[f"{prefix}length_mean"] = float(r.lengths.mean())
    wrong, distinct = distinct_answers(correct, r.text_keys())
    per_prompt = {"correct": correct.sum(1).astype(np.int32), "distinct_wrong": wrong, "distinct": distinct}
    if greedy:
        hits = []
        for start in range(0, len(examples), batch_prompts):
            g = rollout.generate(env, params, examples[start:start + batch_prompts],
                                 num_samples=1, max_new_tokens=max_new_tokens, key=key, temperature=0.0,
                                 phase="eval")
            hits.append(metrics.is_pass(g.rewards[:, 0], threshold))
        per_prompt["greedy"] = np.concatenate(hits).astype(np.int32)
        out[f"{prefix}greedy_accuracy"] = float(per_prompt["greedy"].mean())
    return out, per_prompt
