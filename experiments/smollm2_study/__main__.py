"""python -m experiments.smollm2_study --run      # train what has no record yet (CPU hours; resumable)
python -m experiments.smollm2_study --report   # RESULTS.md from the committed records
python -m experiments.smollm2_study --run --quick --model DIR --out DIR   # smoke test (tests)

Runs go to --runs (default runs/smollm2_study); records and RESULTS.md to --out (default this directory's
results/). The model is the converted SmolLM2 (`make smollm2`; --model to point elsewhere)."""
from __future__ import annotations

import argparse
import os
import sys
import time

from experiments.smollm2_study import report, study


def main(argv=None) -> str:
    p = argparse.ArgumentParser(prog="python -m experiments.smollm2_study", description=__doc__.split("\n")[0])
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--run", action="store_true", help="train the runs without a record, then report")
    what.add_argument("--report", action="store_true", help="only write RESULTS.md from the records")
    p.add_argument("--quick", action="store_true", help="the smoke-test design")
    p.add_argument("--seeds", type=int, default=None, help="seeds (default: the design's)")
    p.add_argument("--model", default="runs/smollm2-135m-instruct", help="converted SmolLM2 directory")
    p.add_argument("--out", default=study.RECORDS, help="records and RESULTS.md")
    p.add_argument("--runs", default=os.path.join("runs", "smollm2_study"), help="run directory")
    args = p.parse_args(argv)
    design = study.DESIGNS["quick" if args.quick else "main"]
    if args.seeds is not None:
        if args.seeds < 1:
            p.error(f"--seeds must be >= 1, got {args.seeds}")
        import dataclasses

        design = dataclasses.replace(design, seeds=args.seeds)
    t0 = time.time()
    if args.run:
        import jax

        jax.config.update("jax_compilation_cache_dir", os.path.join(args.runs, "jax_cache"))
        records = study.run(design, args.runs, args.model, records_dir=args.out,
                            log=lambda msg: print(msg, file=sys.stderr, flush=True))
        print(f"[smollm2 study] {len(records)} runs recorded under {args.out} ({time.time() - t0:.0f} s)",
              file=sys.stderr)
    path = report.write(design, args.out)
    print(f"[smollm2 study] {path}", file=sys.stderr)
    return path


if __name__ == "__main__":
    main()
