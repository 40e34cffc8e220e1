"""End-to-end phase profile of a training run: where the wall-clock time of `trainer.train` goes.

    python -m bench.profile_run [--config=passk_k4] [--config.train.steps=10 ...] [--workdir=DIR] [--keep_sft]

Runs the named config (any `--config.a.b=value` override works, as with `experiments.run`) in a fresh
workdir with a recording `passk_jax.timing.Timers` passed to `trainer.train`; the library reports each phase
to it (no change to the run's numerics; the recorder waits on the arrays of jitted phases):

  warm start (SFT)     the SFT warm start (`trainer.warm_start`)
  prompt preparation   rendering + tokenising prompts (`rollout.generate`)
  prefill / decode     the sampler's two jitted programs, each waited on (this adds one sync between them)
  fetch to host        the rest of `rollout.generate`'s sampling time (device -> host copy, padding)
  detokenise           decoding the completions to text (`rollout.generate`)
  score                `VerifierPool.score` (the verifier, in worker processes or in-process)
  batch assembly       `rollout.to_batch`
  update               the jitted train step (advantage kernel, old-policy pass, loss, backward, AdamW),
                       waited on
  eval                 held-out evaluation (`Run.evaluate`: its sampling and scoring included)
  checkpoint           `Checkpointer.save` and `.wait` (async Orbax: the wait is where a save costs)
  logging              `MetricWriter.write` (JSONL + TensorBoard)
  other                wall time minus the phases: compilation outside the timed calls, report, export

A phase nested in another is charged to the innermost one, except inside eval and the warm start,
which keep everything they call (their sampling is not RL-step sampling). The
share of "host-only" phases (prompt preparation, detokenise, score, batch assembly, logging) is the time
the accelerator would sit idle on a GPU/TPU. By default the SFT cache is disabled so the warm start is
measured; `--keep_sft` reuses `runs/.sft_cache` instead.
"""
from __future__ import annotations

import collections
import contextlib
import shutil
import sys
import tempfile
import time

from absl import app, flags

from experiments import cli, configs
from passk_jax.timing import Timers

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags (defined only when run as a program, so importing this module defines none)."""
    flags.DEFINE_string("workdir", None, "Run directory (default: a fresh temporary directory, removed after).")
    flags.DEFINE_bool("keep_sft", False, "Reuse the SFT cache (runs/.sft_cache) instead of measuring the warm start.")

ABSORBING = ("eval", "warm start (SFT)")  # phases that keep the time of everything they call
HOST_ONLY = ("prompt preparation", "detokenise", "score", "batch assembly", "logging")
ORDER = ("warm start (SFT)", "prompt preparation", "prefill", "decode", "fetch to host", "detokenise", "score",
         "batch assembly", "update", "eval", "checkpoint", "logging", "other")


class Profiler(Timers):
    """Exclusive wall time per phase: a nested phase's time is subtracted from its parent's; jitted phases
    are waited on."""

    def __init__(self):
        self.total = collections.Counter()
        self.calls = collections.Counter()
        self.first: dict[str, float] = {}  # the first call of a jitted phase includes its compilation
        self.stack: list[list] = []  # [name, start, child time]

    @contextlib.contextmanager
    def phase(self, name: str):
        if any(entry[0] in ABSORBING for entry in self.stack):  # inside eval / SFT: charged to them
            yield
            return
        self.stack.append([name, time.perf_counter(), 0.0])
        try:
            yield
        finally:
            _, start, child = self.stack.pop()
            elapsed = time.perf_counter() - start
            self.total[name] += elapsed - child
            self.calls[name] += 1
            if self.calls[name] == 1:
                self.first[name] = elapsed - child
            if self.stack:
                self.stack[-1][2] += elapsed

    def wait(self, x):
        import jax
        return jax.block_until_ready(x)


def table(prof: Profiler, wall: float, rl_steps: int) -> str:
    other = wall - sum(prof.total.values())
    rows = [(name, prof.total.get(name, 0.0) if name != "other" else other, prof.calls.get(name, 0))
            for name in ORDER]
    host = sum(t for name, t, _ in rows if name in HOST_ONLY)
    lines = [f"wall {wall:.1f} s, {rl_steps} RL steps; host-only phases {host:.1f} s ({100 * host / wall:.1f}%)",
             "| phase | total (s) | share | calls | first call (s) | later calls, mean (ms) | per RL step (ms) |",
             "|---|---|---|---|---|---|---|"]
    for name, t, calls in rows:
        first = prof.first.get(name)
        later = (t - first) / (calls - 1) if first is not None and calls > 1 else None
        lines.append(f"| {name} | {t:.2f} | {100 * t / wall:.1f}% | {calls} | "
                     f"{'-' if first is None else f'{first:.2f}'} | {'-' if later is None else f'{1e3 * later:.1f}'} | "
                     f"{1e3 * t / max(rl_steps, 1):.0f} |")
    return "\n".join(lines)


def profile(config, workdir: str | None = None, keep_sft: bool = False) -> tuple[dict, Profiler, float]:
    """Run ``config`` with a recording Profiler: (the run's summary, the profiler, wall seconds). Without
    ``workdir`` a temporary one is used and removed; without ``keep_sft`` the warm start is measured (a
    fresh SFT cache, removed after)."""
    from passk_jax.run import trainer
    from passk_jax.run.spec import RunSpec

    run_dir = workdir or tempfile.mkdtemp(prefix="passk_profile_")
    sft_dir = None
    if not keep_sft:
        sft_dir = tempfile.mkdtemp(prefix="passk_profile_sft_")
        config.sft.cache_dir = sft_dir
    prof = Profiler()
    try:
        spec = RunSpec.from_config(config)
        t0 = time.perf_counter()
        summary = trainer.train(spec, run_dir, timers=prof)
        return summary, prof, time.perf_counter() - t0
    finally:
        if workdir is None:
            shutil.rmtree(run_dir, ignore_errors=True)
        if sft_dir:
            shutil.rmtree(sft_dir, ignore_errors=True)


@cli.one_line_errors
def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import logging

    from absl import logging as absl_logging

    logging.basicConfig(level=logging.WARNING)
    absl_logging.set_verbosity(absl_logging.WARNING)
    config = configs.config_flag_value()
    summary, prof, wall = profile(config, FLAGS.workdir, FLAGS.keep_sft)
    where = FLAGS.workdir or "(temporary, removed)"
    print(f"config {configs.selected_name()}: status {summary.get('status')}, workdir {where}", file=sys.stderr)
    print(table(prof, wall, int(summary.get("step", 0))))


if __name__ == "__main__":
    define_flags()
    configs.define_config_flag()
    app.run(main, flags_parser=cli.flags_parser)
