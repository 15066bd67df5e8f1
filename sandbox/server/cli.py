"""``thyme sandbox serve`` and ``thyme sandbox mcp``: flags mapped one-to-one onto :class:`ServerConfig`.

Only the standard library is imported at load time; FastAPI, uvicorn and the mcp SDK are imported in the handlers.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from thyme.sandbox.server.config import ServerConfig

DEFAULT_MCP_PORT = 8766


def add_server_commands(subcommands: argparse._SubParsersAction) -> None:
    """Adds ``serve`` and ``mcp`` to the ``thyme sandbox`` group."""
    serve = subcommands.add_parser(
        "serve", help="serve a sandbox pool over HTTP (for rollout workers on other machines)",
        description="Serve the sandbox over HTTP: sessions with images, code runs, produced images. "
                    "A non-loopback --host needs --token-file. API reference: docs/server.md and /docs.",
    )  # fmt: skip
    _add_network_flags(serve, default_port=8765)
    _add_limit_flags(serve)
    serve.set_defaults(handler=serve_http)

    mcp = subcommands.add_parser(
        "mcp", help="serve the sandbox as MCP tools (load_image, run_python, close_session)",
        description="Serve the sandbox to MCP clients over stdio (desktop assistants) or streamable HTTP at /mcp.",
    )  # fmt: skip
    mcp.add_argument("--transport", choices=("stdio", "http"), default="stdio", help="MCP transport (default stdio)")
    _add_network_flags(mcp, default_port=DEFAULT_MCP_PORT)
    _add_limit_flags(mcp)
    mcp.set_defaults(handler=serve_mcp)


def _add_network_flags(parser: argparse.ArgumentParser, default_port: int) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=default_port, help=f"TCP port (default {default_port})")
    parser.add_argument("--token-file", type=Path, default=None,
                        help="file whose first line is the bearer token clients must send; required off loopback")
    parser.add_argument("--allow-root", dest="allowed_roots", action="append", type=Path, default=None,
                        metavar="DIR", help="folder whose images clients may name by path (repeatable)")  # fmt: skip
    parser.add_argument("--allow-host", dest="allowed_hosts", action="append", default=None, metavar="NAME",
                        help="another host name clients reach the server by (repeatable; loopback names always)")


def _add_limit_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=int, default=2, help="warm sandbox worker processes (default 2)")
    parser.add_argument("--timeout-s", type=float, default=10.0, help="wall-clock limit of one run (default 10)")
    parser.add_argument("--max-sessions", type=int, default=None, help="open sessions at once (default 4 per worker)")
    parser.add_argument("--max-queue", type=int, default=16, help="requests that may wait for a slot (default 16)")
    parser.add_argument("--queue-wait-s", type=float, default=10.0, help="wait for a slot before 'busy' (default 10)")
    parser.add_argument("--idle-timeout-s", type=float, default=600.0, help="close idle sessions (default 600)")
    parser.add_argument("--max-request-mb", type=float, default=32.0, help="largest request body (default 32)")
    parser.add_argument("--request-timeout-s", type=float, default=30.0,
                        help="drop a request whose headers and body have not arrived within this (default 30)")
    parser.add_argument("--max-pixels", type=int, default=None, help="largest image in pixels (default 64,000,000)")


def _config(args: argparse.Namespace, default_roots: list[Path]) -> ServerConfig:
    from thyme.sandbox.server.config import ServerConfig, read_token_file

    optional = {"max_sessions": args.max_sessions, "max_pixels": args.max_pixels}
    return ServerConfig(
        host=args.host, port=args.port,
        token=read_token_file(args.token_file) if args.token_file is not None else None,
        allowed_roots=args.allowed_roots if args.allowed_roots is not None else default_roots,
        allowed_hosts=args.allowed_hosts or [], request_timeout_s=args.request_timeout_s,
        workers=args.workers, timeout_s=args.timeout_s, max_queue=args.max_queue, queue_wait_s=args.queue_wait_s,
        idle_timeout_s=args.idle_timeout_s, max_request_mb=args.max_request_mb,
        **{name: value for name, value in optional.items() if value is not None},
    )  # fmt: skip


def serve_http(args: argparse.Namespace) -> int:
    """Handler of ``thyme sandbox serve``: runs until interrupted."""
    from thyme.sandbox.server.app import serve

    config = _config(args, default_roots=[])
    access = "bearer token required" if config.token else "no token: loopback only"
    print(f"thyme sandbox server on http://{args.host}:{args.port} ({access}); Ctrl-C stops it", file=sys.stderr)  # noqa: T201 (a CLI)
    serve(config)
    return 0


def serve_mcp(args: argparse.Namespace) -> int:
    """Handler of ``thyme sandbox mcp``: stdio by default, or streamable HTTP with ``--transport http``.

    Over stdio the client is a program the user started, so images under the home folder are readable by path
    unless ``--allow-root`` says otherwise; over HTTP no path is readable unless ``--allow-root`` names it.
    """
    from thyme.sandbox.limits import Limits
    from thyme.sandbox.local import Sandbox
    from thyme.sandbox.server.mcp import run_mcp

    config = _config(args, default_roots=[Path.home()] if args.transport == "stdio" else [])
    limits = Limits(timeout_s=config.timeout_s, max_pixels=config.max_pixels)
    if args.transport == "http":
        print(f"thyme sandbox MCP server on http://{args.host}:{args.port}/mcp", file=sys.stderr)  # noqa: T201 (a CLI)
    with Sandbox(limits=limits, pool_size=config.workers) as sandbox:
        run_mcp(config, sandbox, args.transport)
    return 0
