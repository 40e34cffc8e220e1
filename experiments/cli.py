"""What every entry point shares: one-line errors (a traceback only with ``--debug``) and checking
``--config.a.b=value`` overrides against the config's fields before absl parses them.

Errors of the user's making (a bad value, a missing or unreadable file, a busy or foreign workdir, a
verifier that always fails, a full disk: the path and the space left) print as ``error: <sentence>`` and
exit with status 1; anything else prints
its type and first line with a pointer to ``--debug``. A flag absl cannot parse (``--config.seed=abc``)
prints absl's message the same way: pass ``flags_parser`` to ``app.run``.
"""
from __future__ import annotations

import sys
from typing import Callable

from absl import app, flags

flags.DEFINE_bool("debug", False, "Show the full traceback of an error instead of one line.")


def _user_errors() -> tuple[type[BaseException], ...]:
    from passk_jax.run.monitor import VerifierError
    from passk_jax.run.workdir import WorkdirError

    return ValueError, OSError, WorkdirError, VerifierError


def show_progress_messages() -> None:
    """Print the library's INFO messages (resumed from step N, reused the cached warm start, skipped a
    checkpoint, took over a stale lock) on stderr, whatever absl did to the root logger; storage libraries
    stay at WARNING."""
    import logging

    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every file operation at INFO
    if not flags.FLAGS["debug"].value:  # a failed background save re-raises in the loop: its pages of logs add nothing
        absl_logger = logging.getLogger("absl")
        if not any(isinstance(f, _StorageErrorFilter) for f in absl_logger.filters):
            absl_logger.addFilter(_StorageErrorFilter())
        _silence_closed_loop_callbacks()
    log = logging.getLogger("passk_jax")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


class _StorageErrorFilter:
    """Drops the storage libraries' ERROR records (Orbax / TensorStore tracebacks from background save
    threads, hundreds of lines on a full disk): the same failure surfaces in the training loop and prints as
    one ``error:`` line. ``--debug`` keeps them."""

    def filter(self, record) -> bool:
        path = record.pathname.replace("\\", "/")
        return not (record.levelno >= 40 and ("/orbax/" in path or "/tensorstore/" in path))


def _closed_loop(exc: BaseException | None) -> bool:
    return isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"


def _silence_closed_loop_callbacks() -> None:
    """TensorStore's completion callbacks of a failed background save call into an asyncio loop Orbax has
    already closed, and print one "Event loop is closed" traceback each (dozens on a full disk); those,
    and only those, are dropped."""
    if getattr(sys.excepthook, "_passk_quiet", False):
        return
    previous_except, previous_unraisable = sys.excepthook, sys.unraisablehook

    def excepthook(kind, value, tb):
        if not _closed_loop(value):
            previous_except(kind, value, tb)

    def unraisablehook(info):
        if not _closed_loop(info.exc_value):
            previous_unraisable(info)

    excepthook._passk_quiet = True
    sys.excepthook, sys.unraisablehook = excepthook, unraisablehook


def _debug_requested(argv: list[str]) -> bool:
    """Whether argv turns on ``--debug`` (read before absl has parsed it)."""
    for arg in argv[1:]:
        if arg == "--":
            break
        if arg == "--debug" or (arg.startswith("--debug=") and arg.split("=", 1)[1].lower() not in ("false", "0")):
            return True
    return False


def flags_parser(argv: list[str]) -> list[str]:
    """absl's ``app.run(main, flags_parser=...)`` hook: parse the flags, and on a bad flag value print absl's
    message as one ``error: ...`` line and exit 1 (``--debug``: raise it instead)."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as err:
        if _debug_requested(argv):
            raise
        text = str(err).strip().splitlines()
        print(f"error: {text[0] if text else type(err).__name__}", file=sys.stderr)
        sys.exit(1)


def one_line_errors(main: Callable[[list[str]], None]) -> Callable[[list[str]], None]:
    """Wrap an absl ``main`` so that exceptions print as one ``error: ...`` line and exit 1."""
    def wrapped(argv: list[str]) -> None:
        try:
            main(argv)
        except Exception as err:  # noqa: BLE001 - the one place errors become messages
            if flags.FLAGS["debug"].value or isinstance(err, app.UsageError):
                raise
            from passk_jax.run.workdir import disk_full_message

            text = disk_full_message(err) or str(err).strip() or type(err).__name__
            if not isinstance(err, _user_errors()) and not disk_full_message(err):
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
    from passk_jax.run.workdir import closest_fields

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
