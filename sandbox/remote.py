"""A client for ``thyme sandbox serve`` with the interface of the local ``Sandbox``.

``RemoteSandbox(url, token=...)`` opens sessions on a shared server (or spreads them over several:
``RemoteSandbox([url1, url2])``) and returns the same ``ExecutionResult``; images
the code saved are downloaded into a local scratch dir, so ``result.images`` are local paths inside
``session.scratch_dir``, exactly as with a local pool, and a backend can encode them. Refusals come back as the
exceptions of :mod:`.server.errors` and :mod:`.errors` (``ServerBusy``, ``Unauthorized``, ``SessionNotFound`` (a
``SandboxClosed``), ``RequestRejected`` (an ``InvalidInput``), ``WorkerError``).

httpx is imported when the first client is made, so ``import thyme.sandbox`` needs no server extra.
"""

from __future__ import annotations

import itertools
import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from .errors import InvalidInput, SandboxClosed, SandboxError, WorkerCrashed, WorkerError
from .result import ExecutionResult
from .server.errors import RequestRejected, ServerBusy, ServerError, ServerUnreachable, SessionNotFound, Unauthorized

if TYPE_CHECKING:
    import httpx

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0
DEFAULT_REQUEST_TIMEOUT_S = 300.0  # covers the server's queue wait plus a run; the server bounds both
API_PREFIX = "/v1"
DOWN_RETRY_S = 30.0  # a server that refused a connection gets no new session for this long (unless all are down)
CLIENT_HEADERS = {"X-Thyme-Client": "thyme.sandbox.remote"}  # see server/guard.py: a program, not a web page

_PLAIN_KINDS: dict[str, type[SandboxError]] = {
    "closed": SandboxClosed, "worker_error": WorkerError, "worker_crashed": WorkerCrashed,
}  # fmt: skip
_SERVER_KINDS: dict[str, type[ServerError]] = {
    "busy": ServerBusy, "session_busy": ServerBusy, "unauthorized": Unauthorized, "session_not_found": SessionNotFound,
}  # fmt: skip


def error_from_response(response: httpx.Response) -> SandboxError:
    """Rebuilds the exception the server answered with from its ``{"error": {"kind", "message"}}`` body."""
    try:
        detail = response.json()["error"]
        kind, message = str(detail["kind"]), str(detail["message"])
    except (ValueError, KeyError, TypeError):
        kind, message = "server_error", f"HTTP {response.status_code} from {response.url}: {response.text[:200]}"
    if kind in _PLAIN_KINDS:
        return _PLAIN_KINDS[kind](message)
    if kind in _SERVER_KINDS:
        return _SERVER_KINDS[kind](message, kind=kind, status=response.status_code)
    if 400 <= response.status_code < 500:
        return RequestRejected(message, kind=kind, status=response.status_code)
    return ServerError(message, kind=kind, status=response.status_code)


class _Server:
    """One server of a remote pool: its address, its connection pool, and how this client uses it."""

    def __init__(self, url: str, token: str | None, request_timeout_s: float) -> None:
        import httpx

        if not url.startswith(("http://", "https://")):
            raise InvalidInput(f"sandbox server URL {url!r} must start with http:// or https://")
        self.url = url.rstrip("/")
        headers = dict(CLIENT_HEADERS, **({"Authorization": f"Bearer {token}"} if token else {}))
        self.http = httpx.Client(
            base_url=self.url, headers=headers, timeout=httpx.Timeout(request_timeout_s, connect=CONNECT_TIMEOUT_S)
        )
        self.open_sessions = 0
        self.down_until = 0.0

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """Sends one request; see :meth:`RemoteSandbox.request`. A refused connection marks the server down."""
        import httpx

        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TimeoutException as exc:
            raise ServerUnreachable(f"the sandbox server at {self.url} did not answer {method} {path} in time") \
                from exc
        except httpx.TransportError as exc:
            if isinstance(exc, httpx.ConnectError):
                self.down_until = time.monotonic() + DOWN_RETRY_S
            error = ServerUnreachable(
                f"cannot reach the sandbox server at {self.url} ({exc}): is `thyme sandbox serve` running there?"
            )
            error.never_sent = isinstance(exc, httpx.ConnectError)  # type: ignore[attr-defined]
            raise error from exc
        if response.status_code >= 400:
            raise error_from_response(response)
        return response


class RemoteSandbox:
    """A pool of sandbox sessions on one ``thyme sandbox serve`` server, or spread over several.

    With several URLs, each new session goes to the server holding the fewest of this client's open sessions (ties
    in turn), and stays there: its variables live in that server's worker. A server that refuses connections gets
    no new session for ``DOWN_RETRY_S`` seconds while the others take them; its open sessions fail with
    ``ServerUnreachable`` (a ``SandboxError``) naming it, and the others go on.

    Args:
        url (`str` or `Sequence[str]`): the server's base URL, e.g. ``http://10.0.0.5:8765``, or several.
        token (`str`, *optional*): the bearer token the servers were started with.
        server_paths (`bool`, defaults to `False`): send image paths for the server to open (they must lie under
            one of its ``--allow-root`` folders, e.g. a dataset on shared storage) instead of uploading the files.
        request_timeout_s (`float`, defaults to `300.0`): longest wait for one answer.
        timeout (`float`, *optional*): the per-run limit the caller expects. The server's ``--timeout-s`` decides;
            a different value here is reported once as a warning, so a mismatch between the two is visible.
        **local_options: settings of a local pool (``limits``, ``repairs``, ``pool_size``, ``work_dir``), which a
            remote pool does not take; passing one raises ``InvalidInput`` naming the server flag to use instead.

    Example:
        ```python
        >>> from thyme.sandbox.remote import RemoteSandbox
        >>> servers = ["http://10.0.0.5:8765", "http://10.0.0.6:8765"]
        >>> with RemoteSandbox(servers, token="s3cret") as sb:  # doctest: +SKIP
        ...     session = sb.session(image="/data/17127.jpg", item_id="17127")
        ...     result = session.run(code)
        ...     result.images  # local copies of the saved images
        ```
    """

    def __init__(self, url: str | Sequence[str], token: str | None = None, *, server_paths: bool = False,
                 request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S, timeout: float | None = None,
                 **local_options: Any) -> None:  # fmt: skip
        if local_options:
            raise InvalidInput(
                f"{', '.join(sorted(local_options))} cannot be set on a remote sandbox: the server's pool owns them; "
                "start `thyme sandbox serve` with --workers / --timeout-s / --max-pixels instead"
            )
        try:
            import httpx  # noqa: F401
        except ImportError as exc:  # pragma: no cover - depends on the installed extras
            raise ImportError("the remote sandbox needs httpx: pip install 'thyme-vlm[server]'") from exc
        urls = [url] if isinstance(url, str) else list(url)
        if not urls:
            raise InvalidInput("pass at least one sandbox server URL")
        if len({u.rstrip("/") for u in urls}) != len(urls):
            raise InvalidInput(f"sandbox server URLs repeat: {urls}; list each server once")
        self._servers = [_Server(u, token, request_timeout_s) for u in urls]
        self.urls = [server.url for server in self._servers]
        self.url = self.urls[0]
        self.server_paths = server_paths
        self.timeout = timeout
        self._timeout_checked = timeout is None
        self._turn = itertools.count()
        self._sessions: set[RemoteSession] = set()
        self._lock = threading.Lock()
        self._closed = False

    def request(self, method: str, path: str, *, url: str | None = None, **kwargs: Any) -> httpx.Response:
        """Sends one API request to a server (the first one unless ``url`` names another) and turns any refusal
        into the matching sandbox exception.

        Raises:
            ServerUnreachable: no connection or no answer in time.
            SandboxError: the server refused the request (the subclass it named).
        """
        return self._server(url).request(method, path, **kwargs)

    def _server(self, url: str | None) -> _Server:
        if self._closed:
            raise SandboxClosed(f"the remote sandbox for {', '.join(self.urls)} is closed: make a new RemoteSandbox")
        if url is None:
            return self._servers[0]
        for server in self._servers:
            if server.url == url.rstrip("/"):
                return server
        raise InvalidInput(f"{url!r} is not one of this pool's servers: {', '.join(self.urls)}")

    def session(self, image: str | Path | None = None, *, images: Sequence[str | Path] | None = None,
                item_id: str | None = None) -> RemoteSession:  # fmt: skip
        """Opens a session on a server with one or more images (uploaded unless ``server_paths``).

        Raises:
            InvalidInput: no image, a missing local file, or the server refused an image.
            ServerBusy: the server had no free session slot.
            ServerUnreachable: no server could be reached.
        """
        self._server(None)  # refuses a closed pool
        paths = [Path(p) for p in ([image] if image is not None else []) + list(images or [])]
        if not paths:
            raise InvalidInput("a session needs an image: pass image=PATH or images=[PATH, ...]")
        data: dict[str, Any] = {"item_id": item_id} if item_id is not None else {}
        if not self.server_paths:
            missing = [str(p) for p in paths if not p.is_file()]
            if missing:
                raise InvalidInput(f"image file(s) not found: {', '.join(missing)}")
        failures: list[str] = []
        for server in self._candidates():
            try:
                response = self._open_on(server, paths, data)
            except ServerUnreachable as exc:
                if not getattr(exc, "never_sent", False) or len(self._servers) == 1:
                    raise
                failures.append(str(exc))
                logger.warning("%s; trying another sandbox server", exc)
                continue
            info = response.json()
            self._check_timeout(float(info["run_timeout_s"]))
            remote = RemoteSession(self, server, info)
            with self._lock:
                self._sessions.add(remote)
                server.open_sessions += 1
            return remote
        raise ServerUnreachable(f"none of the {len(self._servers)} sandbox servers could be reached: "
                                + "; ".join(failures))  # fmt: skip

    def _candidates(self) -> list[_Server]:
        """The servers in the order to try: live ones first, fewest open sessions first, ties in turn."""
        now, turn = time.monotonic(), next(self._turn)
        count = len(self._servers)
        with self._lock:
            return sorted(self._servers, key=lambda s: (s.down_until > now, s.open_sessions,
                                                        (self._servers.index(s) - turn) % count))  # fmt: skip

    def _open_on(self, server: _Server, paths: list[Path], data: dict[str, Any]) -> httpx.Response:
        if self.server_paths:
            return server.request("POST", f"{API_PREFIX}/sessions", data=dict(data, paths=[str(p) for p in paths]))
        handles = [p.open("rb") for p in paths]
        try:
            files = [("images", (p.name, handle)) for p, handle in zip(paths, handles, strict=True)]
            return server.request("POST", f"{API_PREFIX}/sessions", data=data, files=files)
        finally:
            for handle in handles:
                handle.close()

    def _check_timeout(self, server_timeout_s: float) -> None:
        if not self._timeout_checked and self.timeout != server_timeout_s:
            logger.warning("sandbox server %s runs code with a %g s limit, not the %g s asked for; its --timeout-s "
                           "decides", self.url, server_timeout_s, self.timeout)  # fmt: skip
        self._timeout_checked = True

    def run(self, code: str, image: str | Path | None = None, *, images: Sequence[str | Path] | None = None,
            item_id: str | None = None) -> ExecutionResult:  # fmt: skip
        """Runs ``code`` once in a fresh session and closes it.

        As with a local ``Sandbox.run``, the images are deleted with the session: copy ``result.images`` first if
        you need them, or use :meth:`session`. (Keeping them would leave one temp folder per call behind in a
        training loop.)
        """
        with self.session(image, images=images, item_id=item_id) as session:
            return session.run(code)

    def health(self, url: str | None = None) -> dict[str, Any]:
        """A server's ``/healthz`` answer (sessions open, workers alive); the first server unless ``url``."""
        return dict(self.request("GET", "/healthz", url=url).json())

    def metrics(self, url: str | None = None) -> dict[str, Any]:
        """A server's ``/metrics`` answer (runs, errors by kind, queue length, latency percentiles, RSS)."""
        return dict(self.request("GET", "/metrics", url=url).json())

    def _forget(self, session: RemoteSession) -> None:
        with self._lock:
            if session in self._sessions:
                self._sessions.discard(session)
                session.server.open_sessions -= 1

    def close(self) -> None:
        """Closes every session this client opened, then the connection pools. Safe to call twice."""
        if self._closed:
            return
        with self._lock:
            sessions = list(self._sessions)
        for session in sessions:
            session.close()
        self._closed = True
        for server in self._servers:
            server.http.close()

    def __enter__(self) -> RemoteSandbox:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:  # fmt: skip
        self.close()


class RemoteSession:
    """One conversation on one server: variables persist from one ``run`` to the next, as in a local session.

    Attributes:
        url (`str`): the server the session lives on (it never moves: its variables are there).
        input_paths (`list[str]`): the image paths on the server, to tell the model; its code opens them there.
        scratch_dir (`Path`): a local folder holding the downloaded copies of the images the code saved; also
            ``results_dir``, the name a local session gives the folder of its returned images.
    """

    def __init__(self, sandbox: RemoteSandbox, server: _Server, info: dict[str, Any]) -> None:
        self._sandbox = sandbox
        self.server = server
        self.url = server.url
        self.session_id = str(info["session_id"])
        self.input_paths: list[str] = list(info["input_paths"])
        self.server_scratch_dir = str(info["scratch_dir"])
        self.scratch_dir = Path(tempfile.mkdtemp(prefix="thyme-remote-"))
        self.results_dir = self.scratch_dir
        self._closed = False

    def run(self, code: str) -> ExecutionResult:
        """Runs ``code`` on the server and downloads the images it saved.

        Returns:
            `ExecutionResult`: as from a local session; ``images`` are local paths in ``scratch_dir``, and server
            scratch paths in ``stdout`` and ``error`` are rewritten to that local folder.

        Raises:
            SandboxClosed: the session was closed here, or closed or expired on the server (``SessionNotFound``).
            ServerUnreachable: the session's server is down; the session is lost with it (open a new one).
            ServerError: the server refused the request (busy, unauthorized, code too long).
        """
        if self._closed:
            raise SandboxClosed(f"session {self.session_id} is closed: open a new session")
        url = f"{API_PREFIX}/sessions/{self.session_id}/run"
        try:
            answer = self.server.request("POST", url, json={"code": code}).json()
            local_images = [self._download(ref["name"], ref["url"]) for ref in answer["images"]]
        except ServerUnreachable as exc:
            raise ServerUnreachable(f"{exc} Session {self.session_id} lived on that server and is lost with its "
                                    "variables: open a new session (it goes to a server that answers)") from exc
        return ExecutionResult(
            ok=bool(answer["ok"]),
            stdout=self._localise(answer["stdout"]),
            error=None if answer["error"] is None else self._localise(answer["error"]),
            images=[str(p) for p in local_images],
            repairs=[self._localise(note) for note in answer.get("repairs", [])],
        )

    def _download(self, name: str, url: str) -> Path:
        target = self.scratch_dir / Path(name).name
        target.write_bytes(self.server.request("GET", url).content)
        return target

    def _localise(self, text: str) -> str:
        return text.replace(self.server_scratch_dir.rstrip("/"), str(self.scratch_dir))

    def close(self) -> None:
        """Closes the session on the server and deletes the local copies. Safe to call twice; a session whose
        server is down is closed here all the same."""
        if self._closed:
            return
        self._closed = True
        self._sandbox._forget(self)
        try:
            self.server.request("DELETE", f"{API_PREFIX}/sessions/{self.session_id}")
        except (SessionNotFound, SandboxClosed):
            logger.debug("session %s was already gone on the server", self.session_id)
        except ServerUnreachable as exc:
            logger.warning("session %s could not be closed on its server: %s", self.session_id, exc)
        finally:
            shutil.rmtree(self.scratch_dir, ignore_errors=True)

    def __enter__(self) -> RemoteSession:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:  # fmt: skip
        self.close()
