"""What every entry point shares: one-line errors (a traceback only with ``--debug``) and checking
``--config.a.b=value`` overrides against the config's fields before absl parses them.

Errors of the user's making (a bad value, a missing or unreadable file, a busy or foreign workdir, a
verifier that always fails) print as ``error: <sentence>`` and exit with status 1; anything else prints
its type and first line with a pointer to ``--debug``.
"""
from __future__ import annotations

import sys
from typing import Callable

from absl import app, flags

flags.DEFINE_bool("debug", False, "Show the full traceback of an error instead of one line.")


def _user_errors() -> tuple[type[BaseException], ...]:
    from passk_jax.rl.monitor import VerifierError
    from passk_jax.workdir import WorkdirError

    return ValueError, OSError, WorkdirError, VerifierError


def show_progress_messages() -> None:
    """Print the library's INFO messages (resumed from step N, reused the cached warm start, skipped a
    checkpoint, took over a stale lock) on stderr, whatever absl did to the root logger; storage libraries
    stay at WARNING."""
    import logging

    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every file operation at INFO
    log = logging.getLogger("passk_jax")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def one_line_errors(main: Callable[[list[str]], None]) -> Callable[[list[str]], None]:
    """Wrap an absl ``main`` so that exceptions print as one ``error: ...`` line and exit 1."""
    def wrapped(argv: list[str]) -> None:
        try:
            main(argv)
        except Exception as err:  # noqa: BLE001 - the one place errors become messages
            if flags.FLAGS.debug or isinstance(err, app.UsageError):
                raise
            text = str(err).strip() or type(err).__name__
            if not isinstance(err, _user_errors()):
                text = f"{type(err).__name__}: {text.splitlines()[0]} (rerun with --debug for the traceback)"
            print(f"error: {text}", file=sys.stderr)
            sys.exit(1)
    return wrapped


def config_fields(config) -> list[str]:
    """Every dotted field name of a ConfigDict (sections included)."""
    from ml_collections import ConfigDict

    out = []
    for key, value in config.items():
        out.append(key)
        if isinstance(value, ConfigDict):
            out.extend(f"{key}.{sub}" for sub in config_fields(value))
    return out


def check_overrides(argv: list[str], config, name: str) -> None:
    """Exit with one line naming the first ``--config.FIELD`` override that is not a field of ``config``,
    and the closest valid names."""
    from passk_jax.workdir import closest_fields

    fields = config_fields(config)
    for arg in argv[1:]:
        if arg == "--":
            break
        if not arg.startswith("--config."):
            continue
        field = arg[len("--config."):].split("=", 1)[0]
        if field not in fields:
            close = closest_fields(field, fields)
            hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else "."
            sys.exit(f"error: unknown config field {field!r} (config {name!r}){hint}")
