"""An ASGI middleware that refuses request bodies over a size limit, before they are read into memory or disk.

Written by hand because Starlette and uvicorn have no body-size limit of their own; it is the one place that sees
every request before FastAPI parses a multipart form.
"""

from __future__ import annotations

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
