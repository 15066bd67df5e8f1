"""Sub-commands of the ``thyme`` CLI.

Every module listed here has ``add_parser(commands)``, which adds its sub-command(s) with
``set_defaults(handler=...)``; a handler takes the parsed namespace and returns an exit code. These modules import
only the standard library at load time and pull in the heavy parts inside the handler.
"""

from __future__ import annotations

import argparse
import importlib

# Order is the order of `thyme --help`. A plain list, not a plugin system: a new command is one line here.
COMMAND_MODULES = (
    "thyme.sandbox.cli",
    "thyme.commands.tiny_model",
    "thyme.commands.answer",
    "thyme.commands.eval",
    "thyme.commands.serve",
    "thyme.commands.data",
    "thyme.ui.cli",
)


def register_all(commands: argparse._SubParsersAction) -> None:
    """Adds every command group's parsers to ``commands``."""
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(commands)
