"""The ``thyme`` command: maps flags onto the library and nothing more.

Each command group registers itself from a small module that imports only :mod:`argparse` at load time, so that
``thyme sandbox run`` never pays for importing torch. Handlers return an exit code; library errors become one line
on stderr and exit code 1.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    """Builds the ``thyme`` parser with every sub-command."""
    from thyme.commands import register_all

    parser = argparse.ArgumentParser(
        prog="thyme",
        description="Thyme: a multimodal model that thinks with images by writing Python run in a sandbox.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages to stderr")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    register_all(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``thyme`` console script; returns the process exit code."""
    from thyme.errors import ThymeError
    from thyme.sandbox.errors import SandboxError

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.handler(args) or 0)
    except (ThymeError, SandboxError) as exc:
        print(f"thyme: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("thyme: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
