"""The sandbox as a tool server: the HTTP API (``thyme sandbox serve``) and the MCP tools (``thyme sandbox mcp``).

Layers, outermost first:

- ``guard``: refuses requests a web page in the user's browser could send (DNS rebinding, cross-origin, simple
  cross-site posts); reusable by any of Thyme's HTTP servers;
- ``limits``: request-body size and the time a request's headers and body may take to arrive;
- ``app`` (FastAPI routes) and ``mcp`` (MCP tools): the two front ends;
- ``sessions``: the bounded table of open sessions both front ends share; ``inputs``: uploaded and server-side
  images, header-checked; ``metrics``; ``config`` (every knob, validated once); ``errors`` (what the API answers
  and the remote client raises); ``cli`` (the flags).

FastAPI, uvicorn and the mcp SDK are imported by ``app`` and ``mcp`` only: ``errors`` and ``config`` (which the
remote client needs) import the standard library alone, so this package's ``__init__`` imports nothing heavy and
``create_app``/``serve`` are loaded on first use.
"""

from __future__ import annotations

from typing import Any

from .config import ServerConfig
from .errors import RequestRejected, ServerBusy, ServerError, ServerUnreachable, SessionNotFound, Unauthorized

__all__ = [
    "RequestRejected",
    "ServerBusy",
    "ServerConfig",
    "ServerError",
    "ServerUnreachable",
    "SessionNotFound",
    "Unauthorized",
    "create_app",
    "serve",
]


def __getattr__(name: str) -> Any:
    if name in ("create_app", "serve"):
        from . import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
