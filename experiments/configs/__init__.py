"""Named configs: one module per name in this package, each with ``get_config() -> ConfigDict``.

``define_config_flag()`` turns ``--config=NAME`` into ml_collections' config-file flag for this package's
NAME.py, so ``--config.a.b=value`` overrides work for every field (with type checking); an override of a
field the config does not have stops with one line naming the closest fields.
"""
from __future__ import annotations

import importlib
import os
import pkgutil
import sys

from ml_collections import ConfigDict

_DIR = os.path.dirname(os.path.abspath(__file__))
_HIDDEN = {"base"}
_selected: list[str] = []


def names() -> list[str]:
    """Every named config (modules of this package, except the shared base)."""
    return sorted(m.name for m in pkgutil.iter_modules([_DIR]) if m.name not in _HIDDEN)


def get(name: str) -> ConfigDict:
    """The config called ``name``; an unknown name is an error listing the valid ones."""
    if name not in names():
        raise ValueError(f"unknown config {name!r}; available configs: {', '.join(names())}.")
    return importlib.import_module(f"experiments.configs.{name}").get_config()


def architecture(name: str) -> str | None:
    """The built-in architecture (``experiments.plan.ARCHITECTURES``) a named config's checkpoint has, when
    its module declares one (``ARCHITECTURE = "qwen2.5-7b"``): what plans it without the checkpoint."""
    return getattr(importlib.import_module(f"experiments.configs.{name}"), "ARCHITECTURE", None)


def define_config_flag(argv: list[str] | None = None) -> None:
    """Resolve ``--config=NAME`` in argv to this package's file and define the ``config`` flag."""
    from ml_collections import config_flags

    argv = sys.argv if argv is None else argv
    name = "passk_k4"
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            name = arg.split("=", 1)[1]
            if name.endswith(".py"):
                name = os.path.splitext(os.path.basename(name))[0]
            if name not in names():
                sys.exit(f"error: unknown config {name!r}; available configs: {', '.join(names())}.")
            argv[i] = f"--config={os.path.join(_DIR, name + '.py')}"
    _selected[:] = [name]
    from experiments.cli import check_overrides

    check_overrides(argv, get(name), name)
    config_flags.DEFINE_config_file("config", os.path.join(_DIR, name + ".py"), "Named config.",
                                    lock_config=True)


def selected_name() -> str:
    return _selected[0] if _selected else "passk_k4"


def config_flag_value() -> ConfigDict:
    from absl import flags

    return flags.FLAGS.config
