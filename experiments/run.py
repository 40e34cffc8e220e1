"""Train with a named config:  python -m experiments.run --config=NAME [--config.a.b=value ...] [--workdir=DIR]

NAME is a module in experiments/configs/ (``passk_k4``, ``pass1``, ...). Any field can be overridden on the
command line; an unknown config name, an unknown field or an impossible value stops the run with one
sentence (``error: ...``; ``--debug`` shows the traceback) before anything compiles. A workdir belongs to one
run: rerunning the same command resumes from the newest readable checkpoint; a workdir in use by another
process, or holding a run with a different config, is refused unless ``--new_run`` (which moves the old
run's files to WORKDIR/previous_runs/ and starts afresh).
Multi-host: ``--coordinator_address/--num_processes/--process_id`` (or the PASSK_* environment variables
that launch/local_multiprocess.sh sets); on Cloud TPU and Slurm, jax.distributed auto-detects them.
"""
from __future__ import annotations

import os
import sys

from absl import app, flags

from experiments import cli, configs

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Output directory (default runs/NAME).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 for multi-process runs.")
flags.DEFINE_integer("num_processes", None, "Number of processes in a multi-process run.")
flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")
flags.DEFINE_bool("new_run", False, "Start a new run in a workdir that holds another run: its files move to "
                  "WORKDIR/previous_runs/<time>/ (nothing is deleted).")


@cli.one_line_errors
def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from passk_jax import parallel

    parallel.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    from passk_jax.run import trainer
    from passk_jax.run.spec import RunSpec

    cli.show_progress_messages()
    spec = RunSpec.from_config(configs.config_flag_value())
    workdir = FLAGS.workdir or os.path.join("runs", configs.selected_name())
    summary = trainer.train(spec, workdir, new_run=FLAGS.new_run)
    if summary.get("status") == "preempted":
        print(f"stopped by {summary.get('signal')} after step {summary['step']}; rerun the same command "
              "to resume.", file=sys.stderr)
        sys.exit(143)
    if summary.get("status") == "done":
        print(f"done: report at {os.path.join(workdir, 'report.md')}")


if __name__ == "__main__":
    configs.define_config_flag()
    app.run(main, flags_parser=cli.flags_parser)
