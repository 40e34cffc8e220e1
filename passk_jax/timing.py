"""Phase timers: the seam through which the trainer, the rollout and the sampler say where wall time goes.

The library enters ``timers.phase(name)`` around each phase and calls ``timers.wait(x)`` on the arrays a
jitted phase produced. The default ``NO_TIMERS`` does neither (no clock, no device sync), so a run without
timers computes and synchronises exactly as one with none. ``bench/profile_run.py`` passes a subclass that
records exclusive wall time per phase and waits on the arrays.

Phases, and who reports them: "warm start (SFT)" and "checkpoint" / "logging" (``run/trainer.py``: the warm
start, ``Checkpointer.save`` / ``.wait``, ``MetricWriter.write``), "eval" (``Run.evaluate``), "batch assembly"
and "update" (``Run.rl_step``: ``rollout.to_batch``, the train step), "prompt preparation", "fetch to host",
"detokenise", "score" (``rollout.generate``: rendering + tokenising, the sampling section around the
sampler's programs, decoding the completions, the verifier), "prefill" and "decode" (``Sampler.sample``).
Phases nest: "prefill" and "decode" run inside "fetch to host", and every phase of an RL step may run inside
"eval" or the warm start.
"""
from __future__ import annotations

import contextlib
from typing import Any, ContextManager

_NOTHING = contextlib.nullcontext()


class Timers:
    """No timing (the default): ``phase`` is an empty context and ``wait`` returns its argument."""

    def phase(self, name: str) -> ContextManager[None]:
        """A context around one phase called ``name``."""
        del name
        return _NOTHING

    def wait(self, x: Any) -> Any:
        """Called inside a phase on the arrays it produced; a timer that measures device time blocks here."""
        return x


NO_TIMERS = Timers()
