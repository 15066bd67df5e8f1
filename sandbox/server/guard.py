"""Refuses the requests a web page in the user's browser could make to a server on this machine.

A server on 127.0.0.1 without a token is reachable by every page the user opens: the page cannot read the answers
of a cross-origin request, but it can *send* "simple" requests (a form post, multipart included), and with DNS
rebinding (``evil.example`` re-resolved to 127.0.0.1) it becomes same-origin and can read them too. The MCP
transport security guidance asks servers to validate ``Host`` and ``Origin``; this middleware does that for any
ASGI app, and also refuses the simple cross-site post:

1. ``Host`` must name one of the allowed host names (any port), when the server knows them: loopback names for a
   loopback server, plus any name given with ``--allow-host``. A rebinding page sends its own name and is refused.
2. ``Origin``, when a browser sends one, must be the server's own origin (``http://<Host>``); ``null`` and any other
   page are refused.
3. On a server without a token, a request that changes state (POST, PUT, PATCH, DELETE) must carry a JSON
   content type or the ``X-Thyme-Client`` header: a page can send neither cross-site without a CORS preflight,
   which this server never approves. Programs (the remote client, curl) add the header; a form cannot. (With a
   token, the ``Authorization`` header it needs plays that part.)

Written here rather than taken from Starlette's ``TrustedHostMiddleware`` (host only, no origin or preflight rule)
or the mcp SDK's ``TransportSecurityMiddleware`` (bound to its transport), so that every Thyme HTTP server (the
sandbox API, the MCP transport, a future agent server) shares one small, tested rule set.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

from .config import LOOPBACK_NAMES, is_loopback_host

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

CLIENT_HEADER = "X-Thyme-Client"
"""The header programs send on state-changing requests (any value); browsers cannot add it cross-site."""
STATE_CHANGING_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", *LOOPBACK_NAMES})


def allowed_host_names(bound_host: str, extra: Iterable[str] = ()) -> frozenset[str] | None:
    """The ``Host`` names a server bound to ``bound_host`` should accept, or ``None`` for any.

    Args:
        bound_host (`str`): the address the server listens on.
        extra (`Iterable[str]`): more names the server is reached by (a proxy's name, an /etc/hosts alias).

    Returns:
        `frozenset[str]` or `None`: lower-case host names without port. A loopback server accepts the loopback
        names and ``extra``; a server on another address accepts anything unless ``extra`` names what it
        accepts (it needs a token there, which a browser page does not have).
    """
    names = {name.lower().strip("[]") for name in extra}
    if is_loopback_host(bound_host):
        return frozenset(LOOPBACK_HOSTS | {bound_host.lower().strip("[]")} | names)
    return frozenset(names) if names else None


def host_name(host_header: str) -> str:
    """``127.0.0.1:8765`` -> ``127.0.0.1``, ``[::1]:8765`` -> ``::1``, ``Example.org`` -> ``example.org``."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    name, _, port = host.rpartition(":")
    return name if name and port.isdigit() else host


def refusal(scope: Scope, allowed_hosts: frozenset[str] | None,
            client_header_required: bool = True) -> tuple[int, str, str] | None:  # fmt: skip
    """Says why a request must be refused, or ``None`` when it may pass.

    Args:
        scope: the ASGI scope of an HTTP request.
        allowed_hosts (`frozenset[str]` or `None`): from :func:`allowed_host_names`.
        client_header_required (`bool`, defaults to `True`): apply rule 3 (off where a token is required).

    Returns:
        `tuple[int, str, str]` or `None`: HTTP status, error kind and message.
    """
    headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope.get("headers") or ()}
    host = headers.get("host", "")
    if allowed_hosts is not None and host_name(host) not in allowed_hosts:
        return (421, "host_not_allowed",
                f"Host {host!r} is not a name of this server ({', '.join(sorted(allowed_hosts))}): a web page "
                "re-pointing its own name at this machine is refused. Connect by one of those names, or start the "
                "server with --allow-host NAME")  # fmt: skip
    origin = headers.get("origin")
    if origin is not None and origin.lower() != f"{scope.get('scheme', 'http')}://{host}".lower():
        return (403, "origin_not_allowed",
                f"requests from the web page at {origin!r} are refused: this server answers programs, not other "
                "sites. Call it from a program (without an Origin header)")  # fmt: skip
    if client_header_required and scope.get("method", "GET").upper() in STATE_CHANGING_METHODS:
        content_type = headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if content_type != "application/json" and CLIENT_HEADER.lower() not in headers:
            return (403, "cross_site_request",
                    f"a {scope.get('method')} without a JSON body needs the header '{CLIENT_HEADER}: 1', so that a "
                    "web page's form cannot send it: add the header")  # fmt: skip
    return None


class BrowserGuard:
    """ASGI middleware applying :func:`refusal` to every HTTP request; refusals are answered as JSON
    ``{"error": {"kind", "message"}}``, the sandbox API's error shape.

    Args:
        app: the ASGI app to protect.
        allowed_hosts (`frozenset[str]` or `None`): from :func:`allowed_host_names`.
        client_header_required (`bool`, defaults to `True`): refuse state-changing requests that are neither JSON
            nor marked with ``X-Thyme-Client`` (pass ``False`` where a bearer token is required anyway).
        on_reject (`Callable[[str], None]`, *optional*): called with the error kind on each refusal (metrics).
    """

    def __init__(self, app: ASGIApp, allowed_hosts: frozenset[str] | None, client_header_required: bool = True,
                 on_reject: Callable[[str], None] | None = None) -> None:  # fmt: skip
        self.app = app
        self.allowed_hosts = allowed_hosts
        self.client_header_required = client_header_required
        self.on_reject = on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        refused = refusal(scope, self.allowed_hosts, self.client_header_required) if scope["type"] == "http" else None
        if refused is None:
            await self.app(scope, receive, send)
            return
        status, kind, message = refused
        if self.on_reject is not None:
            self.on_reject(kind)
        body = json.dumps({"error": {"kind": kind, "message": message}}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})  # fmt: skip
        await send({"type": "http.response.body", "body": body})
