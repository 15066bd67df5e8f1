"""Errors of the sandbox tool server, shared by the server (which answers with them) and the remote client.

The HTTP API answers every refusal as ``{"error": {"kind": ..., "message": ...}}`` with a status code; the
:class:`~thyme.sandbox.remote.RemoteSandbox` turns that back into the same exception class, so code written against
a local ``Sandbox`` catches the same errors from a remote pool.

```
SandboxError                       (thyme.sandbox.errors)
├── ServerError                    the server refused or failed a request; has .kind and .status
│   ├── ServerBusy                 no session slot came free in time, or the session is running code (503/409)
│   ├── Unauthorized               the bearer token is missing or wrong (401)
│   ├── ServerUnreachable          no answer from the server (connection refused, timeout)
│   ├── RequestRejected            bad input: too large, not an image, path not allowed (4xx); also InvalidInput
│   └── SessionNotFound            the session was closed or expired (404); also SandboxClosed
```
"""

from __future__ import annotations

from ..errors import InvalidInput, SandboxClosed, SandboxError


class ServerError(SandboxError):
    """The sandbox server refused or failed a request.

    Args:
        message (`str`): what went wrong and what to do, shown to the user as is.
        kind (`str`, *optional*): the machine-readable error name of the API; defaults to the class's.
        status (`int`, *optional*): the HTTP status; defaults to the class's.
    """

    kind = "server_error"
    status: int | None = 500

    def __init__(self, message: str, *, kind: str | None = None, status: int | None = None) -> None:
        super().__init__(message)
        if kind is not None:
            self.kind = kind
        if status is not None:
            self.status = status


class ServerBusy(ServerError):
    """Every session slot is taken and none came free within the wait; retry later."""

    kind = "busy"
    status = 503


class Unauthorized(ServerError):
    """The request carried no bearer token or a wrong one."""

    kind = "unauthorized"
    status = 401


class ServerUnreachable(ServerError):
    """The server could not be reached or did not answer in time."""

    kind = "unreachable"
    status = None


class RequestRejected(ServerError, InvalidInput):
    """The request's input was refused (too large, not an image, a path outside the allowed roots)."""

    kind = "invalid_input"
    status = 400


class SessionNotFound(ServerError, SandboxClosed):
    """The session id is unknown: it was closed, or it expired after sitting idle."""

    kind = "session_not_found"
    status = 404
