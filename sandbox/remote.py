"""A client for ``thyme sandbox serve`` with the interface of the local ``Sandbox``.

``RemoteSandbox(url, token=...)`` opens sessions on a shared server and returns the same ``ExecutionResult``; images
the code saved are downloaded into a local scratch dir, so ``result.images`` are local paths inside
``session.scratch_dir``, exactly as with a local pool, and a backend can encode them. Refusals come back as the
exceptions of :mod:`.server_errors` and :mod:`.errors` (``ServerBusy``, ``Unauthorized``, ``SessionNotFound`` (a
``SandboxClosed``), ``RequestRejected`` (an ``InvalidInput``), ``WorkerError``).

httpx is imported when the first client is made, so ``import thyme.sandbox`` needs no server extra.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from .errors import InvalidInput, SandboxClosed, SandboxError, WorkerCrashed, WorkerError
from .result import ExecutionResult
from .server_errors import RequestRejected, ServerBusy, ServerError, ServerUnreachable, SessionNotFound, Unauthorized

if TYPE_CHECKING:
    import httpx

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0
DEFAULT_REQUEST_TIMEOUT_S = 300.0  # covers the server's queue wait plus a run; the server bounds both
API_PREFIX = "/v1"

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


class RemoteSandbox:
    """A pool of sandbox sessions on a ``thyme sandbox serve`` server.

    Args:
        url (`str`): the server's base URL, e.g. ``http://10.0.0.5:8765``.
        token (`str`, *optional*): the bearer token the server was started with.
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
        >>> with RemoteSandbox("http://127.0.0.1:8765", token="s3cret") as sb:  # doctest: +SKIP
        ...     session = sb.session(image="/data/17127.jpg", item_id="17127")
        ...     result = session.run(code)
        ...     result.images  # local copies of the saved images
        ```
    """

    def __init__(self, url: str, token: str | None = None, *, server_paths: bool = False,
                 request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S, timeout: float | None = None,
                 **local_options: Any) -> None:  # fmt: skip
        if local_options:
            raise InvalidInput(
                f"{', '.join(sorted(local_options))} cannot be set on a remote sandbox: the server's pool owns them; "
                "start `thyme sandbox serve` with --workers / --timeout-s / --max-pixels instead"
            )
        try:
            import httpx
        except ImportError as exc:  # pragma: no cover - depends on the installed extras
            raise ImportError("the remote sandbox needs httpx: pip install 'thyme-vlm[server]'") from exc
        if not url.startswith(("http://", "https://")):
            raise InvalidInput(f"sandbox server URL {url!r} must start with http:// or https://")
        self.url = url.rstrip("/")
        self.server_paths = server_paths
        self.timeout = timeout
        self._timeout_checked = timeout is None
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(
            base_url=self.url, headers=headers, timeout=httpx.Timeout(request_timeout_s, connect=CONNECT_TIMEOUT_S)
        )
        self._sessions: set[RemoteSession] = set()
        self._lock = threading.Lock()
        self._closed = False

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """Sends one API request and turns any refusal into the matching sandbox exception.

        Raises:
            ServerUnreachable: no connection or no answer in time.
            SandboxError: the server refused the request (the subclass it named).
        """
        import httpx

        if self._closed:
            raise SandboxClosed(f"the remote sandbox for {self.url} is closed: make a new RemoteSandbox")
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TimeoutException as exc:
            raise ServerUnreachable(f"the sandbox server at {self.url} did not answer {method} {path} in time") \
                from exc
        except httpx.TransportError as exc:
            raise ServerUnreachable(
                f"cannot reach the sandbox server at {self.url} ({exc}): is `thyme sandbox serve` running there?"
            ) from exc
        if response.status_code >= 400:
            raise error_from_response(response)
        return response

    def session(self, image: str | Path | None = None, *, images: Sequence[str | Path] | None = None,
                item_id: str | None = None) -> RemoteSession:  # fmt: skip
        """Opens a session on the server with one or more images (uploaded unless ``server_paths``).

        Raises:
            InvalidInput: no image, a missing local file, or the server refused an image.
            ServerBusy: the server had no free session slot.
        """
        paths = [Path(p) for p in ([image] if image is not None else []) + list(images or [])]
        if not paths:
            raise InvalidInput("a session needs an image: pass image=PATH or images=[PATH, ...]")
        data: dict[str, Any] = {"item_id": item_id} if item_id is not None else {}
        if self.server_paths:
            data["paths"] = [str(p) for p in paths]
            response = self.request("POST", f"{API_PREFIX}/sessions", data=data)
        else:
            response = self._upload(paths, data)
        info = response.json()
        self._check_timeout(float(info["run_timeout_s"]))
        remote = RemoteSession(self, info)
        with self._lock:
            self._sessions.add(remote)
        return remote

    def _check_timeout(self, server_timeout_s: float) -> None:
        if not self._timeout_checked and self.timeout != server_timeout_s:
            logger.warning("sandbox server %s runs code with a %g s limit, not the %g s asked for; its --timeout-s "
                           "decides", self.url, server_timeout_s, self.timeout)  # fmt: skip
        self._timeout_checked = True

    def _upload(self, paths: list[Path], data: dict[str, Any]) -> httpx.Response:
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise InvalidInput(f"image file(s) not found: {', '.join(missing)}")
        handles = [p.open("rb") for p in paths]
        try:
            files = [("images", (p.name, handle)) for p, handle in zip(paths, handles, strict=True)]
            return self.request("POST", f"{API_PREFIX}/sessions", data=data, files=files)
        finally:
            for handle in handles:
                handle.close()

    def run(self, code: str, image: str | Path | None = None, *, images: Sequence[str | Path] | None = None,
            item_id: str | None = None) -> ExecutionResult:  # fmt: skip
        """Runs ``code`` once in a fresh session and closes it.

        As with a local ``Sandbox.run``, the images are deleted with the session: copy ``result.images`` first if
        you need them, or use :meth:`session`. (Keeping them would leave one temp folder per call behind in a
        training loop.)
        """
        with self.session(image, images=images, item_id=item_id) as session:
            return session.run(code)

    def health(self) -> dict[str, Any]:
        """The server's ``/healthz`` answer (sessions open, workers alive)."""
        return dict(self.request("GET", "/healthz").json())

    def metrics(self) -> dict[str, Any]:
        """The server's ``/metrics`` answer (runs, errors by kind, queue length, latency percentiles, RSS)."""
        return dict(self.request("GET", "/metrics").json())

    def _forget(self, session: RemoteSession) -> None:
        with self._lock:
            self._sessions.discard(session)

    def close(self) -> None:
        """Closes every session this client opened, then the connection pool. Safe to call twice."""
        if self._closed:
            return
        with self._lock:
            sessions = list(self._sessions)
        for session in sessions:
            session.close()
        self._closed = True
        self._http.close()

    def __enter__(self) -> RemoteSandbox:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:  # fmt: skip
        self.close()


class RemoteSession:
    """One conversation on the server: variables persist from one ``run`` to the next, as in a local session.

    Attributes:
        input_paths (`list[str]`): the image paths on the server, to tell the model; its code opens them there.
        scratch_dir (`Path`): a local folder holding the downloaded copies of the images the code saved.
    """

    def __init__(self, sandbox: RemoteSandbox, info: dict[str, Any]) -> None:
        self._sandbox = sandbox
        self.session_id = str(info["session_id"])
        self.input_paths: list[str] = list(info["input_paths"])
        self.server_scratch_dir = str(info["scratch_dir"])
        self.scratch_dir = Path(tempfile.mkdtemp(prefix="thyme-remote-"))
        self._closed = False

    def run(self, code: str) -> ExecutionResult:
        """Runs ``code`` on the server and downloads the images it saved.

        Returns:
            `ExecutionResult`: as from a local session; ``images`` are local paths in ``scratch_dir``, and server
            scratch paths in ``stdout`` and ``error`` are rewritten to that local folder.

        Raises:
            SandboxClosed: the session was closed here, or closed or expired on the server (``SessionNotFound``).
            ServerError: the server refused the request (busy, unauthorized, code too long).
        """
        if self._closed:
            raise SandboxClosed(f"session {self.session_id} is closed: open a new session")
        url = f"{API_PREFIX}/sessions/{self.session_id}/run"
        answer = self._sandbox.request("POST", url, json={"code": code}).json()
        local_images = [self._download(ref["name"], ref["url"]) for ref in answer["images"]]
        return ExecutionResult(
            ok=bool(answer["ok"]),
            stdout=self._localise(answer["stdout"]),
            error=None if answer["error"] is None else self._localise(answer["error"]),
            images=[str(p) for p in local_images],
            repairs=[self._localise(note) for note in answer.get("repairs", [])],
        )

    def _download(self, name: str, url: str) -> Path:
        target = self.scratch_dir / Path(name).name
        target.write_bytes(self._sandbox.request("GET", url).content)
        return target

    def _localise(self, text: str) -> str:
        return text.replace(self.server_scratch_dir.rstrip("/"), str(self.scratch_dir))

    def close(self) -> None:
        """Closes the session on the server and deletes the local copies. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._sandbox._forget(self)
        try:
            self._sandbox.request("DELETE", f"{API_PREFIX}/sessions/{self.session_id}")
        except (SessionNotFound, SandboxClosed):
            logger.debug("session %s was already gone on the server", self.session_id)
        finally:
            shutil.rmtree(self.scratch_dir, ignore_errors=True)

    def __enter__(self) -> RemoteSession:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:  # fmt: skip
        self.close()
