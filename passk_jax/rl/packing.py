"""Micro-batches by length: which rows the update computes, in which micro-batch, at which width (host numpy).

The padded update runs every row of a mini-batch at the batch's full width ``S`` (prompt bucket +
``max_new_tokens``). ``plan`` instead takes the rows that can move the parameters (``need``), puts each in the
bucket of the smallest width of a fixed ladder of ``buckets`` widths that holds it (last real token + 1), and
cuts the buckets, widest first, into micro-batches trimmed on the right to their width, each holding at most
``budget`` tokens (rows x width). Every micro-batch belongs to one mini-batch (each mini-batch is its own optimiser update).

Shapes are bounded so that the number of compiled programs is too: a micro-batch is ``[rows, width]`` with
``width`` one of the ``len(ladder) <= buckets`` ladder values and ``rows`` the bucket's capacity
``dp * floor(budget / width / dp)``, or a half or a quarter of it (rounded up to ``dp``; the last micro-batch of
a bucket), so at most ``3 * buckets`` shapes per prompt bucket (``shape_bound``). The slots that rounding up
adds are filled with the next, narrower rows, which are then computed for free.
Rows are dealt to the data-parallel shards back and forth in order of width (shard d gets rows d,
2 dp - 1 - d, 2 dp + d, ...), so every shard holds about the same number of tokens. Empty slots hold row index -1 (no tokens, no loss).
"""
from __future__ import annotations

import dataclasses

import numpy as np

# the row counts a micro-batch of one width may have: 1/4, 1/2 or all of its capacity (few shapes, so few
# compilations: on a CPU one costs more than many steps' savings; a power-of-two ladder compiled ~10 shapes
# in a 40-step default run and lost more to compilation than it saved)
ROW_FRACTIONS = (4, 2, 1)


@dataclasses.dataclass(frozen=True)
class Micro:
    """One micro-batch: ``rows`` i64[r] row indices into the batch (-1 = empty slot), trimmed to ``width``."""

    minibatch: int
    width: int
    rows: np.ndarray

    @property
    def used(self) -> int:
        return int(np.sum(self.rows >= 0))


def ladder(start: int, total: int, buckets: int, multiple: int = 8) -> tuple[int, ...]:
    """The widths a micro-batch may take: ``start`` (the first trained position, i.e. the prompt bucket) plus
    ``j / buckets`` of the completion span ``total - start``, rounded up to ``multiple``, j = 1..buckets, and
    never above ``total``; deduplicated, increasing, always ending with ``total``."""
    if not 0 <= start <= total or buckets < 1:
        raise ValueError(f"ladder needs 0 <= start <= total and buckets >= 1, got {start}, {total}, {buckets}.")
    span = total - start
    def up(x: int, m: int) -> int:
        return -(-x // m) * m
    widths = {min(total, start + up(up(span * j, buckets) // buckets, multiple)) for j in range(1, buckets + 1)}
    return tuple(sorted(widths | {total}))


def capacity(width: int, budget: int, dp: int) -> int:
    """Rows of a full micro-batch of this width: the most multiple of ``dp`` with rows x width <= budget."""
    return (budget // width) // dp * dp


def _rows_for(count: int, cap: int, dp: int) -> int:
    """Slots for ``count`` rows: the smallest of ``ROW_FRACTIONS`` of the capacity (rounded up to a multiple of
    ``dp``) that holds them."""
    for frac in ROW_FRACTIONS:
        slots = min(cap, -(-cap // (frac * dp)) * dp)
        if slots >= count:
            return slots
    return cap


def _deal(order: np.ndarray, slots: int, dp: int) -> np.ndarray:
    """Rows ``order`` (widest first) into ``slots`` = dp x per slots, shard-major, dealt back and forth over the
    shards so each gets about the same number of tokens; -1 fills the rest."""
    per = slots // dp
    out = np.full((dp, per), -1, np.int64)
    for t, r in enumerate(order):
        lap, pos = divmod(t, dp)
        out[pos if lap % 2 == 0 else dp - 1 - pos, lap] = r
    return out.reshape(-1)


def plan(widths: np.ndarray, need: np.ndarray, minibatch: np.ndarray, num_minibatches: int,
         widths_ladder: tuple[int, ...], budget: int, dp: int) -> list[list[Micro]]:
    """Per mini-batch, the micro-batches that compute the rows ``need`` (bool[R]) of it.

    ``widths`` i64[R]: the columns a row uses (last real token + 1); ``minibatch`` i64[R]: its mini-batch.
    Raises ValueError when the widest ladder value does not fit one data-parallel row group in ``budget``.
    """
    top = widths_ladder[-1]
    if capacity(top, budget, dp) < dp:
        raise ValueError(f"step.max_tokens_per_microbatch={budget} is smaller than {dp} row(s) of the batch's "
                         f"full width {top} (prompt bucket + max_new_tokens, x the data-parallel size {dp}); "
                         f"raise it to at least {top * dp}.")
    lad = np.asarray(widths_ladder)
    bucket = lad[np.minimum(np.searchsorted(lad, widths), len(lad) - 1)]
    out: list[list[Micro]] = []
    for m in range(num_minibatches):
        rows = np.flatnonzero(need & (minibatch == m))
        rows = rows[np.argsort(-widths[rows], kind="stable")]  # widest first
        micros = []
        while len(rows):
            width = int(bucket[rows[0]])
            cap = capacity(width, budget, dp)
            own = min(int(np.sum(bucket[rows] == width)), cap)  # the rows of this bucket that fit
            slots = _rows_for(own, cap, dp)
            # the slots the rounding adds take the next (narrower) rows: computed anyway, so free
            micros.append(Micro(m, width, _deal(rows[:slots], slots, dp)))
            rows = rows[slots:]
        out.append(micros)
    return out


def shape_bound(widths_ladder: tuple[int, ...], budget: int, dp: int) -> int:
    """The most distinct [rows, width] micro-batch shapes ``plan`` can produce for this ladder and budget."""
    return sum(len({_rows_for(c, capacity(w, budget, dp), dp) for c in range(1, capacity(w, budget, dp) + 1)})
               for w in widths_ladder)
