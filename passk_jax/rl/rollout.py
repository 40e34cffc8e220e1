"""Host-side glue of one RL step: prompts -> group samples -> verifier rewards -> a ``step.Batch``.

Row layout everywhere is prompt-major (row = p * n + j). The batch a train step consumes is the prompt,
left-padded to the sampler's bucket, followed by the completion, right-padded to ``max_new_tokens``; the
sampler's log-probabilities sit at the completion columns, aligned with the tokens they score.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Sequence

import jax
import numpy as np

from passk_jax.rl.step import Batch
from passk_jax.sampling import Sampler, SampleOutput, left_pad
from passk_jax.tasks import Example, Task
from passk_jax.tasks.pool import VerifierPool
from passk_jax.tasks.tokenizer import decode_response, encode_prompt


@dataclasses.dataclass
class Rollouts:
    """Everything sampled and scored for P prompts x n samples (host numpy, prompt-major rows)."""

    examples: list[Example]
    prompts: list[list[int]]      # token ids per prompt
    tokens: np.ndarray            # i32[P*n, T] completion tokens
    logprobs: np.ndarray          # f32[P*n, T] sampler log-probs (behaviour policy)
    mask: np.ndarray              # bool[P*n, T]
    lengths: np.ndarray           # i32[P*n]
    truncated: np.ndarray         # bool[P*n]
    texts: list[str]              # decoded completions
    rewards: np.ndarray           # f32[P, n]
    timings: dict[str, float]

    @property
    def num_samples(self) -> int:
        return self.rewards.shape[1]

    def select(self, keep: np.ndarray) -> Rollouts:
        """The prompts where ``keep`` (bool[P]) is True, with their rows."""
        rows = np.repeat(keep, self.num_samples)
        return Rollouts([e for e, k in zip(self.examples, keep) if k],
                        [p for p, k in zip(self.prompts, keep) if k],
                        self.tokens[rows], self.logprobs[rows], self.mask[rows], self.lengths[rows],
                        self.truncated[rows], [t for t, k in zip(self.texts, rows) if k],
                        self.rewards[keep], dict(self.timings))

    @staticmethod
    def concat(parts: Sequence[Rollouts]) -> Rollouts:
        timings: dict[str, float] = {}
        for part in parts:
            for key, value in part.timings.items():
                timings[key] = timings.get(key, 0.0) + value
        return Rollouts(sum((p.examples for p in parts), []), sum((p.prompts for p in parts), []),
                        *(np.concatenate([getattr(p, f) for p in parts]) for f in
                          ("tokens", "logprobs", "mask", "lengths", "truncated")),
                        sum((p.texts for p in parts), []),
                        np.concatenate([p.rewards for p in parts]), timings)


def generate(sampler: Sampler, params: Any, task: Task, tokenizer: Any, pool: VerifierPool,
             examples: Sequence[Example], *, num_samples: int, max_new_tokens: int, key: jax.Array,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
             chunk_prompts: int = 0) -> Rollouts:
    """Sample ``num_samples`` completions per example and score them with the task's verifier.

    ``chunk_prompts`` > 0 samples at most that many prompts per sampler call (the decode KV cache grows
    with prompts x samples; large models need chunks), chunk c drawing with ``fold_in(key, c)``.
    """
    t0 = time.perf_counter()
    prompts = [encode_prompt(tokenizer, task.render(ex)) for ex in examples]
    size = chunk_prompts if 0 < chunk_prompts < len(prompts) else len(prompts)
    outs = []
    for c, start in enumerate(range(0, len(prompts), size)):
        out: SampleOutput = sampler.sample(
            params, prompts[start:start + size], num_samples=num_samples, max_new_tokens=max_new_tokens,
            temperature=temperature, top_p=top_p, top_k=top_k, eos_ids=eos_ids(tokenizer),
            key=key if size == len(prompts) else jax.random.fold_in(key, c))
        outs.append(jax.device_get(out))  # one transfer per chunk
    host = SampleOutput(*(np.concatenate([np.asarray(getattr(o, f)) for o in outs])
                          for f in SampleOutput._fields))
    t1 = time.perf_counter()
    texts = [decode_response(tokenizer, row[m]) for row, m in zip(host.tokens, host.mask)]
    per_row = [ex for ex in examples for _ in range(num_samples)]
    rewards = pool.score(task.score, per_row, texts).reshape(len(examples), num_samples)
    t2 = time.perf_counter()
    return Rollouts(list(examples), prompts, host.tokens, host.logprobs, host.mask, host.lengths,
                    host.truncated, texts, np.asarray(rewards, np.float32),
                    {"time/sample": t1 - t0, "time/score": t2 - t1})


def eos_ids(tokenizer: Any) -> tuple[int, ...]:
    """End-of-sequence ids of a tokenizer (its eos token, plus Qwen-style <|im_end|> / <|endoftext|>)."""
    ids = [tokenizer.eos_token_id]
    for name in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>"):
        tid = tokenizer.convert_tokens_to_ids(name) if name in tokenizer.get_vocab() else None
        ids.append(tid)
    return tuple(dict.fromkeys(int(i) for i in ids if i is not None))


def to_batch(r: Rollouts, *, bucket: int, pad_id: int) -> Batch:
    """Pack rollouts into the train step's ``Batch`` (host numpy; the step places it on the mesh)."""
    n = r.num_samples
    p_tokens, p_pos, p_mask = left_pad(r.prompts, bucket, pad_id)
    rep = lambda x: np.repeat(x, n, axis=0)  # noqa: E731 - prompt rows -> sample rows
    prompt_len = rep(p_mask.sum(1).astype(np.int32))
    t = r.tokens.shape[1]
    c_pos = prompt_len[:, None] + np.arange(t, dtype=np.int32)[None]
    zeros = np.zeros((r.tokens.shape[0], bucket), np.float32)
    return Batch(
        tokens=np.concatenate([rep(p_tokens), np.where(r.mask, r.tokens, pad_id)], 1).astype(np.int32),
        positions=np.concatenate([rep(p_pos), np.where(r.mask, c_pos, 0)], 1).astype(np.int32),
        token_mask=np.concatenate([rep(p_mask), r.mask], 1),
        loss_mask=np.concatenate([np.zeros_like(rep(p_mask)), r.mask], 1),
        sampler_logprobs=np.concatenate([zeros, np.where(r.mask, r.logprobs, 0.0)], 1).astype(np.float32),
        rewards=r.rewards.astype(np.float32),
        valid=np.ones(r.rewards.shape, bool),
    )


def rollout_metrics(r: Rollouts, prefix: str = "rollout/") -> dict[str, float]:
    """Host-side statistics of a rollout batch (reward, lengths, truncation, zero-variance groups)."""
    spread = r.rewards.max(1) - r.rewards.min(1)
    return {
        f"{prefix}reward_mean": float(r.rewards.mean()),
        f"{prefix}reward_std": float(r.rewards.std()),
        f"{prefix}length_mean": float(r.lengths.mean()),
        f"{prefix}length_max": float(r.lengths.max()),
        f"{prefix}truncated_frac": float(r.truncated.mean()),
        f"{prefix}solved_none_frac": float((r.rewards.max(1) <= 0).mean()),
        f"{prefix}solved_all_frac": float((r.rewards.min(1) >= 1).mean()),
        f"{prefix}zero_variance_frac": float((spread == 0).mean()),
        f"{prefix}distinct_texts_per_prompt": float(np.mean(
            [len(set(r.texts[i * r.num_samples:(i + 1) * r.num_samples])) for i in range(len(r.examples))])),
    }
