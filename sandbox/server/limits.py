"""Limits on what a request may cost the server before the app sees it: its body size, and the time it takes to
arrive.

- :class:`BodySizeLimit`, an ASGI middleware, refuses bodies over a size limit before they are read into memory or
  disk (Starlette and uvicorn have no body-size limit of their own; it is the one place that sees every request
  before FastAPI parses a multipart form).
- :func:`deadline_protocol` gives uvicorn an HTTP protocol class that closes a connection whose request (headers
  and body) has not fully arrived within a deadline. uvicorn has no such timeout (its keep-alive timer is reset by
  every byte, and the request-start timeout planned in uvicorn issue #157 was never built), and an ASGI middleware
  cannot help with headers, because the app is only called once they are complete. Without it, a client sending
  half a request holds a connection forever.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

REJECT_KIND = "request_too_large"


class BodySizeLimit:
    """Answers 413 to a request whose body is larger than ``max_bytes``.

    A declared ``Content-Length`` over the limit is refused before a byte is read. A body without one (chunked)
    is counted as it streams; past the limit the app sees the client disconnect, and whatever it answers is
    replaced by the 413.

    Args:
        app: the ASGI app to protect.
        max_bytes (`int`): the largest body accepted.
        on_reject (`Callable[[str], None]`, *optional*): called with the error kind on each refusal (metrics).
    """

    def __init__(self, app: ASGIApp, max_bytes: int, on_reject: Callable[[str], None] | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.on_reject = on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._reject(send, f"{int(declared):,} bytes")
            return
        state = {"received": 0, "exceeded": False, "answered": False}

        async def counting_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > self.max_bytes:
                    state["exceeded"] = True
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            if not state["exceeded"]:
                await send(message)
            elif not state["answered"]:
                state["answered"] = True
                await self._reject(send, f"more than {self.max_bytes:,} bytes")

        await self.app(scope, counting_receive, guarded_send)
        if state["exceeded"] and not state["answered"]:
            await self._reject(send, f"more than {self.max_bytes:,} bytes")

    async def _reject(self, send: Send, size: str) -> None:
        if self.on_reject is not None:
            self.on_reject(REJECT_KIND)
        message = (
            f"the request body is {size}; this server accepts at most {self.max_bytes:,} bytes "
            f"({self.max_bytes / 2**20:g} MB): send a smaller image, or start the server with a larger "
            "--max-request-mb"
        )
        body = json.dumps({"error": {"kind": REJECT_KIND, "message": message}}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def deadline_protocol(timeout_s: float) -> type[asyncio.Protocol]:
    """Returns uvicorn's HTTP protocol class (httptools when installed, else h11) with a request deadline.

    The deadline starts when the connection opens and again when a response is complete (keep-alive); it stops
    once the request's headers and whole body have arrived, so a long run (the app working, not the client
    sending) is never cut. Past it, the connection is closed; an app still waiting for the body sees a
    disconnect.

    Args:
        timeout_s (`float`): seconds a request may take to arrive.

    Returns:
        `type`: a class for ``uvicorn.Config(http=...)``.
    """
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as base
    except ImportError:
        from uvicorn.protocols.http.h11_impl import H11Protocol as base  # type: ignore[assignment]

    class RequestDeadlineProtocol(base):  # type: ignore[valid-type, misc]
        # Relies on two attributes both uvicorn protocols have: ``cycle`` (the current request) and its
        # ``more_body`` (False once the body is complete). tests/sandbox/test_server_guard.py covers the h11 one (the
        # dev install has no httptools).
        _deadline: asyncio.TimerHandle | None = None
        _armed_cycle: Any = None  # the request whose response re-armed the deadline (already complete)

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._deadline is not None and self._arrived():
                self._disarm()

        def on_response_complete(self) -> None:
            finished = self.cycle  # super() may already start the next, pipelined request
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm(finished)
                if self._arrived():
                    self._disarm()  # a pipelined request that had already arrived

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arrived(self) -> bool:
            return self.cycle is not None and self.cycle is not self._armed_cycle and not self.cycle.more_body

        def _arm(self, finished: Any = None) -> None:
            self._disarm()
            self._armed_cycle = finished
            self._deadline = self.loop.call_later(timeout_s, self._expire)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expire(self) -> None:
            self._deadline = None
            if not self.transport.is_closing():
                self.logger.info("closing a connection whose request did not arrive within %g s", timeout_s)
                self.transport.close()

    return RequestDeadlineProtocol
