"""Browser protections of ``thyme serve``, as one ASGI middleware: Host check, Origin check, JSON-only POSTs.

A server on loopback is still reachable from any web page the user opens: the page can send a "simple" cross-site
POST (form or text/plain body, no preflight), or rebind its own DNS name to 127.0.0.1 and read the answers. This
middleware refuses, before any route runs:

- a ``Host`` header that is not one of the configured names (DNS rebinding: the page's name is not ours);
- an ``Origin`` header that is not explicitly allowed (a page calling us from a browser);
- a ``POST`` whose ``Content-Type`` is not ``application/json`` (a simple request that skips the CORS preflight).

Non-browser clients (the ``openai`` SDK, curl, lmms-eval) send the right Host, no Origin and JSON, so they pass.
Written as one self-contained middleware so that a shared guard (the sandbox server's, once it has one) can replace
it in one line of :func:`thyme.serve.app.create_app`; Starlette's TrustedHostMiddleware covers only the first check.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Collection, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


def _host_name(host: str) -> str:
    """The Host header without its port (``[::1]:8000`` -> ``[::1]``, ``localhost:80`` -> ``localhost``)."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class BrowserGuard:
    """Refuses requests a web page could forge (see the module docstring) with 403/415 and a JSON error.

    Args:
        app: the ASGI app to protect.
        allowed_hosts: Host names accepted (compared without port and case).
        allowed_origins: Origin values accepted (exact, e.g. ``https://chat.example.org``).
        on_reject: called with the error kind of each refusal (metrics).
    """

    def __init__(
        self,
        app: Callable[[Scope, Receive, Send], Awaitable[None]],
        allowed_hosts: Collection[str],
        allowed_origins: Collection[str] = (),
        on_reject: Callable[[str], None] | None = None,
    ) -> None:
        self.app = app
        self.hosts = {host.lower() for host in allowed_hosts}
        self.origins = set(allowed_origins)
        self.on_reject = on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}
        problem = self._problem(scope["method"], headers)
        if problem is None:
            await self.app(scope, receive, send)
            return
        status, kind, message = problem
        if self.on_reject is not None:
            self.on_reject(kind)
        body = json.dumps({"error": {"type": kind, "code": kind, "message": message}}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})

    def _problem(self, method: str, headers: dict[str, str]) -> tuple[int, str, str] | None:
        host = _host_name(headers.get("host", ""))
        if host not in self.hosts:
            return (
                403,
                "host_not_allowed",
                (
                    f"Host {headers.get('host', '')!r} is not one this server answers to; start it with "
                    "--allowed-host NAME for the name clients use"
                ),
            )
        origin = headers.get("origin")
        if origin is not None and origin not in self.origins:
            return (
                403,
                "origin_not_allowed",
                (
                    f"requests from the web page at {origin!r} are refused; start the server with --allowed-origin "
                    f"{origin} to let that page call it"
                ),
            )
        if method == "POST":
            content_type = headers.get("content-type", "").split(";", 1)[0].strip().lower()
            if content_type != "application/json":
                return (
                    415,
                    "unsupported_media_type",
                    (f"POST bodies must be JSON (Content-Type: application/json), not {content_type or 'untyped'!r}"),
                )
        return None


__all__ = ["BrowserGuard"]
