"""Prompts as the sampler reads them: token-id lists, left-padded to the smallest of a few length buckets
(so the decode program compiles once per bucket), checked before anything compiles. Host numpy only."""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

MAX_EOS_IDS = 8  # eos_ids are padded to this many (traced), so changing them does not recompile


def default_buckets(max_len: int, smallest: int = 16) -> tuple[int, ...]:
    """Powers of two >= `smallest` below `max_len`, then `max_len` itself."""
    out, b = [], smallest
    while b < max_len:
        out.append(b)
        b *= 2
    return tuple(out) + (max_len,)


def left_pad(prompts: Sequence[Sequence[int]], length: int, pad_id: int = 0
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Left-pad prompts to `length`: tokens i32[P, length], positions i32[P, length], mask bool[P, length].

    Real tokens get positions 0..len-1; padding gets position 0 and mask False."""
    n = len(prompts)
    tokens = np.full((n, length), pad_id, np.int32)
    mask = np.zeros((n, length), bool)
    lens = np.array([len(p) for p in prompts], np.int32)
    for i, p in enumerate(prompts):
        if len(p):
            tokens[i, length - len(p):] = p
            mask[i, length - len(p):] = True
    positions = np.maximum(np.arange(length, dtype=np.int32)[None] - (length - lens)[:, None], 0)
    return tokens, positions.astype(np.int32), mask


def bucket_for(buckets: Sequence[int], longest: int) -> int:
    """The smallest of the (sorted) ``buckets`` that holds a prompt of ``longest`` tokens."""
    return next(b for b in buckets if b >= longest)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class PaddedPrompts:
    """P prompts left-padded (``left_pad``) to the smallest of ``buckets`` that holds the longest: the layout
    prefill reads and the prompt columns of the train batch (``rollout.to_batch``). Host numpy; ``select``
    and ``concat`` keep that layout (they only drop or add left padding columns)."""

    tokens: np.ndarray     # i32[P, W]
    positions: np.ndarray  # i32[P, W]
    mask: np.ndarray       # bool[P, W]
    buckets: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    pad_id: int = dataclasses.field(metadata=dict(static=True))

    @classmethod
    def pad(cls, prompts: Sequence[Sequence[int]], buckets: Sequence[int], pad_id: int) -> PaddedPrompts:
        buckets = tuple(sorted(set(int(b) for b in buckets)))
        return cls(*left_pad(prompts, bucket_for(buckets, max(len(p) for p in prompts)), pad_id), buckets,
                   int(pad_id))

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def _width(self, width: int) -> PaddedPrompts:
        """The same prompts left-padded to ``width`` (as ``left_pad`` would): left columns dropped or added."""
        cut = self.tokens.shape[1] - width

        def fit(x: np.ndarray, fill: Any) -> np.ndarray:
            return x[:, cut:] if cut >= 0 else np.pad(x, ((0, 0), (-cut, 0)), constant_values=fill)

        return PaddedPrompts(fit(self.tokens, self.pad_id), fit(self.positions, 0), fit(self.mask, False),
                             self.buckets, self.pad_id)

    def select(self, keep: np.ndarray) -> PaddedPrompts:
        """The prompts where ``keep`` (bool[P]) is True, in the bucket of the longest of them."""
        keep = np.asarray(keep, bool)
        kept = PaddedPrompts(self.tokens[keep], self.positions[keep], self.mask[keep], self.buckets, self.pad_id)
        longest = int(kept.mask.sum(1).max()) if len(kept) else 1
        return kept._width(bucket_for(self.buckets, longest))

    @staticmethod
    def concat(items: Sequence[PaddedPrompts]) -> PaddedPrompts:
        """The prompts of every item in order, in the widest item's bucket."""
        width = max(item.tokens.shape[1] for item in items)
        items = [item._width(width) for item in items]
        return PaddedPrompts(*(np.concatenate([getattr(item, f) for item in items])
                               for f in ("tokens", "positions", "mask")), items[0].buckets, items[0].pad_id)


def as_prompt_list(prompts: Any) -> list[list[int]]:
    """Accept a list of token-id sequences, a 2-D array of full prompts, or a (tokens, mask) pair of 2-D
    arrays (any padding side; mask marks the real tokens)."""
    if isinstance(prompts, tuple) and len(prompts) == 2 and np.ndim(prompts[0]) == 2:
        toks, mask = np.asarray(prompts[0]), np.asarray(prompts[1], bool)
        return [row[m].tolist() for row, m in zip(toks, mask)]
    if isinstance(prompts, (np.ndarray, jax.Array)):
        if np.ndim(prompts) != 2:
            raise ValueError(f"prompt array must be 2-D [P, L], got shape {np.shape(prompts)}.")
        return np.asarray(prompts).tolist()
    return [list(map(int, p)) for p in prompts]




def validate(prompts: list[list[int]], *, buckets: Sequence[int], context: int, vocab: int, num_samples: int,
             max_new_tokens: int, temperature: float, top_p: float, top_k: int, eos_ids: Sequence[int]) -> int:
    """Eager checks of a sampler call (one clear ValueError each, before anything compiles); returns the
    bucket length."""
    if len(prompts) == 0:
        raise ValueError("prompts is empty: need at least one prompt.")
    if int(num_samples) < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}.")
    if int(max_new_tokens) < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
    if not float(temperature) >= 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}.")
    if not 0 < float(top_p) <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}.")
    if int(top_k) < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}.")
    if len(eos_ids) > MAX_EOS_IDS or any(not 0 <= int(e) < vocab for e in eos_ids):
        raise ValueError(f"eos_ids must be at most {MAX_EOS_IDS} ids in [0, {vocab}), got {eos_ids}.")
    lengths = [len(p) for p in prompts]
    if min(lengths) == 0:
        raise ValueError(f"prompt {lengths.index(0)} is empty: every prompt needs at least one token.")
    longest = max(lengths)
    if longest > buckets[-1]:
        raise ValueError(f"prompt {lengths.index(longest)} has {longest} tokens, longer than the "
                         f"largest bucket {buckets[-1]}.")
    if longest + int(max_new_tokens) > context:
        raise ValueError(f"prompt {lengths.index(longest)} ({longest} tokens) + max_new_tokens "
                         f"{max_new_tokens} exceeds the model context {context}.")
    for i, p in enumerate(prompts):
        if min(p) < 0 or max(p) >= vocab:
            raise ValueError(f"prompt {i} has a token id outside the vocabulary [0, {vocab}).")
    return bucket_for(buckets, longest)
