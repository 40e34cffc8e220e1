"""One command for the reproduction (writes RESULTS.md, CSV and PNG files into --out):

    python -m experiments.reproduce --analyses          # exact analyses, seconds to a couple of minutes
    python -m experiments.reproduce --study             # the pre-registered study (CPU hours; resumable)
    python -m experiments.reproduce --study --pilot --lr 2e-4   # a pilot run (Pass@1 only)
    python -m experiments.reproduce --study --design pilot2     # the second design's pilot (Pass@1, N = 32)
    python -m experiments.reproduce --report            # regenerate RESULTS.md from the committed records
    python -m experiments.reproduce --study --quick     # smoke test of the study (CI, a few minutes)

Runs (checkpoints, metrics) go to --runs (default runs/reproduce); each finished run leaves a small record
under <out>/study/<design>/, which is all the report reads. Rerunning a command skips runs that have a
record and resumes interrupted ones from their checkpoints.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "results")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.reproduce", description=__doc__.split("\n")[0])
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--all", action="store_true", help="exact analyses and training study")
    what.add_argument("--analyses", action="store_true", help="exact analyses only")
    what.add_argument("--study", action="store_true", help="training study only")
    what.add_argument("--report", action="store_true", help="only regenerate RESULTS.md from the records")
    design = p.add_mutually_exclusive_group()
    design.add_argument("--quick", action="store_true", help="tiny study (smoke test), reduced bootstrap sweep")
    design.add_argument("--pilot", action="store_true", help="the pilot design (Pass@1 only)")
    design.add_argument("--design", default=None, help="a design by name (main, pilot, pilot2, second, quick)")
    p.add_argument("--seeds", type=int, default=None, help="seeds per method (default: the design's)")
    p.add_argument("--methods", default=None, help="comma-separated subset of the design's methods")
    p.add_argument("--steps", type=int, default=None, help="RL steps per run (makes another design)")
    p.add_argument("--lr", type=float, default=None, help="RL learning rate (makes another design)")
    p.add_argument("--out", default=None, help=f"output directory (default {DEFAULT_OUT}, quick: .../quick)")
    p.add_argument("--runs", default=None, help="run directory (default runs/reproduce)")
    return p.parse_args(argv)


def main(argv=None) -> str:
    args = parse_args(argv)
    from experiments.reproduce import analyses, report, study

    design = args.design or ("quick" if args.quick else "pilot" if args.pilot else "main")
    quick = design.split("_")[0] == "quick"
    out = args.out or (os.path.join(DEFAULT_OUT, "quick") if quick else DEFAULT_OUT)
    os.makedirs(out, exist_ok=True)
    records_dir = os.path.join(out, "study")
    spec = study.make_spec(design, args.seeds, args.methods.split(",") if args.methods else None, args.steps,
                           args.lr)
    runs_dir = args.runs or os.path.join("runs", "reproduce")
    t0 = time.time()
    if args.all or args.analyses:
        if quick:
            analyses.run(out, seeds=2, groups=(8, 32, 128, 512))
        else:
            analyses.run(out)
        print(f"[reproduce] analyses written to {out} ({time.time() - t0:.0f} s)", file=sys.stderr)
    if args.all or args.study:
        import jax

        # The runs compile the same sampler and SFT programs again and again (each run builds its own
        # jitted functions): a persistent compilation cache compiles each program once.
        jax.config.update("jax_compilation_cache_dir", os.path.join(runs_dir, "jax_cache"))
        try:
            records = study.run(spec, runs_dir, records_dir=records_dir,
                                log=lambda msg: print(msg, file=sys.stderr, flush=True))
        except study.Stopped as stop:  # checkpointed: one line, the exit status of a SIGTERM
            print(stop, file=sys.stderr)
            sys.exit(143)
        print(f"[reproduce] {len(records)} runs of design {spec.name!r} recorded under {records_dir} "
              f"({time.time() - t0:.0f} s)", file=sys.stderr)
    path = report.write(out, records_dir)
    print(f"[reproduce] {path}", file=sys.stderr)
    return path


if __name__ == "__main__":
    main()
