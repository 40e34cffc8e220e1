"""Verifier health over a run: per-phase counters (per step and cumulative, saved in checkpoints), a loud
warning when a step's share of failed responses is too high or more than half of its responses have no
answer the task can extract, and a stop when every response keeps failing."""
from __future__ import annotations

from passk_jax import parallel
from passk_jax.tasks.pool import VerifierPool


class VerifierError(RuntimeError):
    """Every response of several consecutive steps failed in the verifier."""


class VerifierMonitor:
    """Verifier counters per phase (train / eval), per step and cumulative (saved in checkpoints so they
    survive resume), a loud console line when a step's share of failed responses exceeds
    ``task.max_error_frac``, and a stop when every response of ``task.max_failed_steps`` consecutive train
    steps failed. Counts are summed over processes, so every process takes the same decision."""

    KINDS = ("scored", "errors", "invalid", "timeouts", "restarts", "no_answer")

    def __init__(self, pool: VerifierPool, max_error_frac: float, max_failed_steps: int,
                 totals: dict[str, float] | None = None, say=print):
        self.pool, self.max_error_frac, self.max_failed_steps = pool, max_error_frac, max_failed_steps
        self.totals: dict[str, float] = dict(totals or {})
        self.failed_streak = 0
        self.say = say

    def take(self, step: int) -> dict[str, float]:
        """Metrics of the scoring done since the previous call: ``verifier/<phase>/<kind>`` for this step
        and ``verifier/<phase>/<kind>_total`` since the run began."""
        counts, examples = self.pool.take_counts()
        phases = ("train", "eval") + tuple(sorted(set(counts) - {"train", "eval"}))
        flat = parallel.process_sum({f"{phase}/{kind}": float(counts.get(phase, {}).get(kind, 0))
                                     for phase in phases for kind in self.KINDS})
        out = {}
        for name, value in sorted(flat.items()):
            self.totals[name] = self.totals.get(name, 0.0) + value
            out[f"verifier/{name}"] = value
            out[f"verifier/{name}_total"] = self.totals[name]
        for phase in phases:
            scored = flat.get(f"{phase}/scored", 0.0)
            failed = flat.get(f"{phase}/errors", 0.0) + flat.get(f"{phase}/timeouts", 0.0)
            if scored and failed / scored > self.max_error_frac:
                first = (examples.get(phase) or ["on another process"])[0]
                self.say(f"WARNING step {step} ({phase}): {failed:.0f} of {scored:.0f} responses "
                         f"({failed / scored:.0%}) failed in the verifier and scored 0 (e.g. {first}).")
            missing = flat.get(f"{phase}/no_answer", 0.0)
            if scored and missing / scored > 0.5:
                first = (examples.get(f"{phase}/no_answer") or ["on another process"])[0]
                self.say(f"WARNING step {step} ({phase}): {missing:.0f} of {scored:.0f} responses "
                         f"({missing / scored:.0%}) have no answer the task can extract and scored 0 (e.g. {first}); "
                         "check the task's answer format against what the model writes (gym, math: task.options.answer).")
            if phase == "train" and scored:
                self.failed_streak = self.failed_streak + 1 if failed == scored else 0
                if self.failed_streak >= self.max_failed_steps:
                    first = (examples.get(phase) or ["on another process"])[0]
                    raise VerifierError(
                        f"every response of the last {self.failed_streak} training steps failed in the verifier "
                        f"(e.g. {first}); fix the task's score function (task.max_failed_steps="
                        f"{self.max_failed_steps} stops the run; earlier checkpoints are kept).")
        return out
