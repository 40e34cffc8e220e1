"""Host-side glue of one RL step: prompts -> group samples -> verifier rewards -> a ``batch.Batch``.

Row layout everywhere is prompt-major (row = p * n + j). The batch a train step consumes is the prompt as
the sampler left-padded it to its bucket (``SampleOutput.prompts``, carried by ``Rollouts.prompts``),
followed by the completion, right-padded to ``max_new_tokens``; the sampler's log-probabilities sit at the
completion columns, aligned with the tokens they score.

Multi-process runs: every process samples the same global prompt batch (one program over the global mesh),
fetches only the sampler rows it owns (``parallel.row_owners``), detokenises and scores only those, and
``parallel.gather_rows`` assembles rewards, lengths, truncation flags and text ids on every process. The
completions themselves stay on the devices (``DeviceRows``); ``to_batch`` gathers them into the train
step's row layout in one compiled program. One process takes the host-numpy path throughout.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from passk_jax import parallel
from passk_jax.rl.batch import Batch, batch_shardings
from passk_jax.sampling import PaddedPrompts, Sampler, SampleOutput
from passk_jax.tasks import Example, Task, has_answer, reward_spec
from passk_jax.tasks.pool import VerifierPool
from passk_jax.tokenizer import decode_response, encode_prompt
from passk_jax.timing import NO_TIMERS, Timers


class DeviceRows:
    """Rows of global device arrays [R_c, T] (one per sampler call), selected lazily: row i is row
    ``index[i]`` of the parts' concatenation. Selecting and concatenating only touch the host index;
    ``to_batch`` gathers the rows on the devices (multi-process rollouts never fetch other processes' rows).
    """

    def __init__(self, parts: Sequence[jax.Array], index: np.ndarray | None = None):
        self.parts = tuple(parts)
        total = sum(p.shape[0] for p in self.parts)
        self.index = np.arange(total) if index is None else np.asarray(index, np.int64)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.index),) + tuple(self.parts[0].shape[1:])

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, rows: np.ndarray) -> DeviceRows:
        return DeviceRows(self.parts, self.index[rows])

    @staticmethod
    def concat(items: Sequence[DeviceRows]) -> DeviceRows:
        parts, index, offset = [], [], 0
        for item in items:
            parts.extend(item.parts)
            index.append(item.index + offset)
            offset += sum(p.shape[0] for p in item.parts)
        return DeviceRows(parts, np.concatenate(index))


Rows = np.ndarray | DeviceRows


def _concat_rows(items: Sequence[Rows]) -> Rows:
    if isinstance(items[0], DeviceRows):
        return DeviceRows.concat(items)
    return np.concatenate(items)


@dataclasses.dataclass
class Rollouts:
    """Everything sampled and scored for P prompts x n samples (prompt-major rows).

    One process: host numpy throughout. Several processes: ``tokens`` / ``logprobs`` / ``mask`` are
    ``DeviceRows``, ``texts`` holds only this process's rows (None elsewhere), ``text_ids`` (a hash of every
    row's text) stands in for the texts in statistics; the other fields are complete on every process.
    """

    examples: list[Example]
    prompts: PaddedPrompts        # [P, bucket] the prompts as the sampler padded them
    tokens: Rows                  # i32[P*n, T] completion tokens
    logprobs: Rows                # f32[P*n, T] sampler log-probs (behaviour policy)
    mask: Rows                    # bool[P*n, T]
    lengths: np.ndarray           # i32[P*n]
    truncated: np.ndarray         # bool[P*n]
    texts: list[str | None]       # decoded completions
    rewards: np.ndarray           # f32[P, n]
    timings: dict[str, float]
    text_ids: np.ndarray | None = None  # i64[P*n] text hashes (multi-process); None: texts are complete

    @property
    def num_samples(self) -> int:
        return self.rewards.shape[1]

    def text_keys(self) -> Sequence[Any]:
        """Per row, something equal exactly when the texts are equal (the texts, or their ids)."""
        return self.texts if self.text_ids is None else self.text_ids.tolist()

    def select(self, keep: np.ndarray) -> Rollouts:
        """The prompts where ``keep`` (bool[P]) is True, with their rows."""
        rows = np.repeat(keep, self.num_samples)
        return Rollouts([e for e, k in zip(self.examples, keep) if k],
                        self.prompts.select(keep),
                        self.tokens[rows], self.logprobs[rows], self.mask[rows], self.lengths[rows],
                        self.truncated[rows], [t for t, k in zip(self.texts, rows) if k],
                        self.rewards[keep], dict(self.timings),
                        None if self.text_ids is None else self.text_ids[rows])

    @staticmethod
    def concat(parts: Sequence[Rollouts]) -> Rollouts:
        timings: dict[str, float] = {}
        for part in parts:
            for key, value in part.timings.items():
                timings[key] = timings.get(key, 0.0) + value
        ids = [p.text_ids for p in parts]
        return Rollouts(sum((p.examples for p in parts), []), PaddedPrompts.concat([p.prompts for p in parts]),
                        *(_concat_rows([getattr(p, f) for p in parts]) for f in
                          ("tokens", "logprobs", "mask", "lengths", "truncated")),
                        sum((p.texts for p in parts), []),
                        np.concatenate([p.rewards for p in parts]), timings,
                        None if any(i is None for i in ids) else np.concatenate(ids))


@dataclasses.dataclass(frozen=True)
class Env:
    """What rollouts are sampled with and scored against, fixed for a run: the sampler (one model graph),
    the task (prompts and verifier), the tokenizer and the verifier pool. The policy parameters change every
    step and are passed per call."""

    sampler: Sampler
    task: Task
    tokenizer: Any
    pool: VerifierPool
    stop_ids: tuple[int, ...] | None = None  # end-of-sequence ids; None: the tokenizer's (``eos_ids``)


def generate(env: Env, params: Any, examples: Sequence[Example], *, num_samples: int, max_new_tokens: int, key: jax.Array,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
             chunk_prompts: int = 0, phase: str = "train", ignore_eos: bool = False,
             decode_slots: int = 0, timers: Timers = NO_TIMERS) -> Rollouts:
    """Sample ``num_samples`` completions per example and score them with the task's verifier.

    Rewards are checked against the task's declared range (``tasks.reward_spec``); a value outside it is a
    counted verifier error of ``phase`` ("train" / "eval") and scores 0. ``ignore_eos``: every row decodes
    ``max_new_tokens`` (fixed-length workloads: benchmarks, long-response memory checks). ``decode_slots`` > 0:
    continuous batching over that many slots per sampler call (at most the call's rows; same samples).

    ``chunk_prompts`` > 0 samples at most that many prompts per sampler call (the decode KV cache grows
    with prompts x samples; large models need chunks), chunk c drawing with ``fold_in(key, c)``.

    ``timers`` (``passk_jax.timing``): reports "prompt preparation", "fetch to host" (the sampling section:
    the sampler's host work and the device -> host copy, with its "prefill" / "decode" inside), "detokenise"
    and "score".
    """
    sampler, task, tokenizer, pool = env.sampler, env.task, env.tokenizer, env.pool
    t0 = time.perf_counter()
    multiprocess = parallel.is_multiprocess()
    with timers.phase("fetch to host"):
        params = sampler.prepare(params)  # no-op for weights prepared by the caller (once per policy update)
        with timers.phase("prompt preparation"):
            prompts = [encode_prompt(tokenizer, task.render(ex)) for ex in examples]
        stops = env.stop_ids if env.stop_ids is not None else eos_ids(tokenizer)
        size = chunk_prompts if 0 < chunk_prompts < len(prompts) else len(prompts)
        outs = []
        for c, start in enumerate(range(0, len(prompts), size)):
            out: SampleOutput = sampler.sample(
                params, prompts[start:start + size], num_samples=num_samples, max_new_tokens=max_new_tokens,
                temperature=temperature, top_p=top_p, top_k=top_k, eos_ids=() if ignore_eos else stops,
                decode_slots=min(decode_slots, len(prompts[start:start + size]) * num_samples),
                key=key if size == len(prompts) else jax.random.fold_in(key, c), timers=timers)
            outs.append(out if multiprocess else jax.device_get(out))  # one transfer per chunk
        padded = PaddedPrompts.concat([o.prompts for o in outs])
        if not multiprocess:
            host = {f: np.concatenate([np.asarray(getattr(o, f)) for o in outs])
                    for f in ("tokens", "logprobs", "mask", "lengths", "truncated")}
    if multiprocess:
        return _generate_multiprocess(outs, examples, padded, task, tokenizer, pool, num_samples, t0, phase, timers)
    t1 = time.perf_counter()
    with timers.phase("detokenise"):
        texts = [decode_response(tokenizer, row[m]) for row, m in zip(host["tokens"], host["mask"])]
    per_row = [ex for ex in examples for _ in range(num_samples)]
    rewards = _score(pool, task, per_row, texts, phase, timers).reshape(len(examples), num_samples)
    t2 = time.perf_counter()
    return Rollouts(list(examples), padded, host["tokens"], host["logprobs"], host["mask"], host["lengths"],
                    host["truncated"], texts, np.asarray(rewards, np.float32),
                    {"time/sample": t1 - t0, "time/score": t2 - t1})


def _generate_multiprocess(outs: Sequence[SampleOutput], examples: Sequence[Example], prompts: PaddedPrompts,
                           task: Task, tokenizer: Any, pool: VerifierPool, num_samples: int,
                           t0: float, phase: str, timers: Timers) -> Rollouts:
    """``generate`` after sampling, several processes: each fetches, detokenises and scores only the rows it
    owns; per-row results are then assembled on every process."""
    owners, local = [], {"tokens": [], "mask": [], "lengths": [], "truncated": []}
    with timers.phase("fetch to host"):
        for out in outs:
            owner = parallel.row_owners(out.tokens)
            mine = np.flatnonzero(owner == jax.process_index())
            for name in local:
                local[name].append(parallel.fetch_rows(getattr(out, name), mine))
            owners.append(owner)
        owners = np.concatenate(owners)
        local = {name: np.concatenate(v) for name, v in local.items()}
    t1 = time.perf_counter()
    mine = np.flatnonzero(owners == jax.process_index())
    with timers.phase("detokenise"):
        texts = [decode_response(tokenizer, row[m]) for row, m in zip(local["tokens"], local["mask"])]
    per_row = [examples[r // num_samples] for r in mine]
    rewards = _score(pool, task, per_row, texts, phase, timers).reshape(len(mine))
    full = parallel.gather_rows({"rewards": rewards, "lengths": local["lengths"].astype(np.int32),
                                 "truncated": local["truncated"].astype(bool),
                                 "text_ids": np.array([text_id(t) for t in texts], np.int64)}, owners)
    all_texts: list[str | None] = [None] * len(owners)
    for r, text in zip(mine, texts):
        all_texts[r] = text
    t2 = time.perf_counter()
    heavy = {f: DeviceRows([getattr(o, f) for o in outs]) for f in ("tokens", "logprobs", "mask")}
    return Rollouts(list(examples), prompts, heavy["tokens"], heavy["logprobs"], heavy["mask"], full["lengths"],
                    full["truncated"], all_texts, full["rewards"].reshape(len(examples), num_samples),
                    {"time/sample": t1 - t0, "time/score": t2 - t1}, full["text_ids"])


def _score(pool: VerifierPool, task: Task, examples: Sequence[Example], texts: Sequence[str],
           phase: str, timers: Timers) -> np.ndarray:
    reward_range, allow_bool = reward_spec(task)
    with timers.phase("score"):
        scores = pool.score(task.score, examples, texts, phase=phase, reward_range=reward_range,
                            allow_bool=allow_bool)
        missing = [t for ex, t in zip(examples, texts) if has_answer(task, ex, t) is False]
        pool.count_no_answer(phase, len(missing), missing[0] if missing else None)
    return np.asarray(scores, np.float32)


def text_id(text: str) -> int:
    """A 64-bit hash of a text, the same in every process (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(),
                          "little", signed=True)


def eos_ids(tokenizer: Any) -> tuple[int, ...]:
    """End-of-sequence ids of a tokenizer (its eos token, plus Qwen-style <|im_end|> / <|endoftext|>)."""
    ids = [tokenizer.eos_token_id]
    for name in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>"):
        tid = tokenizer.convert_tokens_to_ids(name) if name in tokenizer.get_vocab() else None
        ids.append(tid)
    return tuple(dict.fromkeys(int(i) for i in ids if i is not None))


def checkpoint_stop_ids(tokenizer: Any, hf_path: str = "") -> tuple[int, ...]:
    """The end-of-sequence ids a run stops at: ``eos_token_id`` of the checkpoint's generation_config.json
    (an id or a list: what ``generate`` stops at), then the tokenizer's (``eos_ids``: its EOS token and the
    chat end markers it has), so a chat prompt stops at ``<|im_end|>`` even where the generation config names
    only ``<|endoftext|>``. ValueError, naming the files, when there are none or the config's are not ids."""
    path = os.path.join(hf_path, "generation_config.json") if hf_path else ""
    listed: list = []
    if path and os.path.isfile(path):
        with open(path) as f:
            try:
                value = json.load(f).get("eos_token_id")
            except (json.JSONDecodeError, AttributeError) as err:
                raise ValueError(f"{path} is not a JSON object ({err}).") from None
        listed = [] if value is None else value if isinstance(value, list) else [value]
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in listed):
            raise ValueError(f"{path}: eos_token_id must be a token id or a list of them, got {value!r}.")
    found = tuple(dict.fromkeys([*listed, *eos_ids(tokenizer)]))
    if not found:
        where = f"{hf_path} (generation_config.json and tokenizer files)" if hf_path else "the tokenizer"
        raise ValueError(f"{where} names no end-of-sequence token; set eos_token_id in generation_config.json "
                         "or the tokenizer's eos_token, or set rollout.ignore_eos=True.")
    return found


def to_batch(r: Rollouts) -> Batch:
    """Pack rollouts into the train step's ``Batch``: the prompts as the sampler padded them, then the
    completions (``pad_id`` after their end); host numpy (the step places it on the mesh), or, for
    multi-process ``DeviceRows`` rollouts, global arrays already laid out as the step wants them."""
    p_tokens, p_pos, p_mask, pad_id = r.prompts.tokens, r.prompts.positions, r.prompts.mask, r.prompts.pad_id
    if isinstance(r.tokens, DeviceRows):
        mesh = r.tokens.parts[0].sharding.mesh
        rep = NamedSharding(mesh, PartitionSpec())
        host = [p_tokens, p_pos, p_mask, r.tokens.index.astype(np.int32), r.rewards.astype(np.float32)]
        return _batch_program(mesh, r.num_samples, pad_id)(
            r.tokens.parts, r.logprobs.parts, r.mask.parts, *(parallel.put_global(x, rep) for x in host))
    return _assemble(np, p_tokens, p_pos, p_mask, r.tokens, r.logprobs, r.mask, r.rewards, r.num_samples, pad_id)


def _assemble(xp: Any, p_tokens, p_pos, p_mask, tokens, logprobs, mask, rewards, n: int, pad_id: int) -> Batch:
    """The batch from prompt arrays [P, bucket] and completion rows [P*n, T], with numpy or jax.numpy."""
    rep = lambda x: xp.repeat(x, n, axis=0)  # noqa: E731 - prompt rows -> sample rows
    prompt_len = rep(p_mask.sum(1).astype(np.int32))
    t = tokens.shape[1]
    c_pos = prompt_len[:, None] + xp.arange(t, dtype=np.int32)[None]
    zeros = xp.zeros((tokens.shape[0], p_tokens.shape[1]), np.float32)
    return Batch(
        tokens=xp.concatenate([rep(p_tokens), xp.where(mask, tokens, pad_id)], 1).astype(np.int32),
        positions=xp.concatenate([rep(p_pos), xp.where(mask, c_pos, 0)], 1).astype(np.int32),
        token_mask=xp.concatenate([rep(p_mask), mask], 1),
        loss_mask=xp.concatenate([xp.zeros_like(rep(p_mask)), mask], 1),
        sampler_logprobs=xp.concatenate([zeros, xp.where(mask, logprobs, 0.0)], 1).astype(np.float32),
        rewards=rewards.astype(np.float32),
        valid=xp.ones(rewards.shape, bool),
    )


@functools.lru_cache(maxsize=16)
def _batch_program(mesh: jax.sharding.Mesh, n: int, pad_id: int):
    """One jitted program: gather the rollout rows from the sampler outputs and assemble the Batch with the
    train step's shardings (XLA moves rows between processes where the layouts differ)."""
    def build(tokens, logprobs, mask, p_tokens, p_pos, p_mask, index, rewards):
        rows = lambda parts: jnp.concatenate(parts)[index]  # noqa: E731
        return _assemble(jnp, p_tokens, p_pos, p_mask, rows(tokens), rows(logprobs), rows(mask), rewards, n,
                         pad_id)

    return jax.jit(build, out_shardings=batch_shardings(mesh))


def rollout_metrics(r: Rollouts, prefix: str = "rollout/") -> dict[str, float]:
    """Host-side statistics of a rollout batch (reward, lengths, truncation, zero-variance groups)."""
    spread = r.rewards.max(1) - r.rewards.min(1)
    keys = r.text_keys()
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
            [len(set(keys[i * r.num_samples:(i + 1) * r.num_samples])) for i in range(len(r.examples))])),
    }
