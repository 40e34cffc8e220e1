"""One command for the reproduction (writes RESULTS.md, CSV and PNG files into --out):

    python -m experiments.reproduce --analyses            # exact analyses, seconds to a couple of minutes
    python -m experiments.reproduce --study [--seeds 3]   # training study (CPU: hours; resumable)
    python -m experiments.reproduce --all                 # both
    python -m experiments.reproduce --study --quick       # smoke test of the study (CI, ~1-2 minutes)

Study runs (checkpoints, metrics) go to --runs (default runs/reproduce/<full|quick>); rerunning the same
command skips finished runs and resumes interrupted ones.
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
    p.add_argument("--quick", action="store_true", help="tiny study (smoke test) and a reduced bootstrap sweep")
    p.add_argument("--seeds", type=int, default=None, help="seeds per method (default: 3, quick: 1)")
    p.add_argument("--methods", default=None, help="comma-separated subset of the study's methods")
    p.add_argument("--steps", type=int, default=None, help="override the number of RL steps per run")
    p.add_argument("--out", default=None, help=f"output directory (default {DEFAULT_OUT}, quick: .../quick)")
    p.add_argument("--runs", default=None, help="run directory (default runs/reproduce/<full|quick>)")
    return p.parse_args(argv)


def main(argv=None) -> str:
    args = parse_args(argv)
    from experiments.reproduce import analyses, report, study

    out = args.out or (os.path.join(DEFAULT_OUT, "quick") if args.quick else DEFAULT_OUT)
    os.makedirs(out, exist_ok=True)
    runs_dir = args.runs or os.path.join("runs", "reproduce", "quick" if args.quick else "full")
    if args.all or args.study:
        import jax

        # The runs of a study compile the same sampler and SFT programs again and again (each run builds
        # its own jitted functions): a persistent compilation cache compiles each program once.
        jax.config.update("jax_compilation_cache_dir", os.path.join(runs_dir, "jax_cache"))
    t0 = time.time()
    if args.all or args.analyses:
        if args.quick:
            analyses.run(out, seeds=2, groups=(8, 32, 128, 512))
        else:
            analyses.run(out)
        print(f"[reproduce] analyses written to {out} ({time.time() - t0:.0f} s)", file=sys.stderr)
    if args.all or args.study:
        spec = study.make_spec(args.quick, args.seeds, args.methods.split(",") if args.methods else None,
                               args.steps)
        records = study.run(spec, runs_dir, log=lambda msg: print(msg, file=sys.stderr, flush=True))
        study.write_outputs(study.aggregate(spec, records), out)
        print(f"[reproduce] study of {len(records)} runs written to {out} ({time.time() - t0:.0f} s)",
              file=sys.stderr)
    path = report.write(out)
    print(f"[reproduce] {path}", file=sys.stderr)
    return path


if __name__ == "__main__":
    main()
