"""Write a task's train/test splits in the verl schema (Parquet or JSONL), usable by other frameworks too.

    python -m experiments.make_data --task=maze --out=data/maze                       # paper splits
    python -m experiments.make_data --task=maze --out=DIR --sizes 5 7 --num-train=500 --template=compact
    python -m experiments.make_data --task=countdown --out=DIR --num-train=20000 --num-test=500
    python -m experiments.make_data --task=gym --set dataset=basic_arithmetic --out=DIR --num-train=1000

Maze: `--sizes` are the train sizes (default 9 11 13 15, the paper's), `--test-sizes` default 7..21;
`--num-train` is per size (paper: 10,000), `--num-test` per size (default: 75 for 7x7, 100 otherwise).
Other tasks: `--num-train` / `--num-test` are totals. `--set key=value` passes any other task option
(values parsed as Python literals when possible). Writes OUT/train.<fmt> and OUT/test.<fmt>.
"""
from __future__ import annotations

import argparse
import ast
import os
import sys

from passk_jax import tasks
from passk_jax.tasks.maze import PAPER_TEST_SIZES, PAPER_TRAIN_SIZES
from passk_jax.tasks.verl_data import write_verl


def _literal(value: str):
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.make_data", description=__doc__.split("\n")[0])
    p.add_argument("--task", required=True, choices=[n for n in tasks.names() if n not in ("math", "verl")])
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--format", default="parquet", choices=["parquet", "jsonl"])
    p.add_argument("--template", default=None, choices=["compact", "instruct"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sizes", type=int, nargs="+", help="maze train sizes")
    p.add_argument("--test-sizes", type=int, nargs="+", help="maze test sizes")
    p.add_argument("--num-train", type=int, default=None)
    p.add_argument("--num-test", type=int, default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra task option")
    return p.parse_args(argv)


def main(argv=None) -> dict[str, str]:
    args = parse_args(argv)
    cfg = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        cfg[key] = _literal(value)
    if args.template:
        cfg["template"] = args.template
    num_train, num_test = args.num_train, args.num_test
    if args.task == "maze":
        cfg.setdefault("train_sizes", tuple(args.sizes or PAPER_TRAIN_SIZES))
        cfg.setdefault("test_sizes", tuple(args.test_sizes or PAPER_TEST_SIZES))
        if num_test is not None:
            cfg["test_counts"] = {s: num_test for s in cfg["test_sizes"]}
        num_train = (10_000 if num_train is None else num_train) * len(cfg["train_sizes"])
        num_test = None
    task = tasks.get(args.task, **cfg)
    written = {}
    for split, num in (("test", num_test), ("train", num_train)):
        examples = task.examples(split, num, args.seed)
        path = os.path.join(args.out, f"{split}.{args.format}")
        written[split] = write_verl(examples, path, args.format)
        print(f"{split}: {len(examples)} examples -> {path}", file=sys.stderr)
    return written


if __name__ == "__main__":
    main()
