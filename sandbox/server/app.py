"""The sandbox as an HTTP service: one warm pool shared by rollout workers on other machines.

``create_app(config)`` builds a FastAPI app; ``serve(config)`` runs it on uvicorn (``thyme sandbox serve``). The API
(all JSON, errors as ``{"error": {"kind", "message"}}``; the schema is served at ``/openapi.json``):

```
GET    /healthz                              liveness: sessions open, workers alive (no token needed)
GET    /metrics                              runs, errors by kind, queue length, latency p50/p90/p99, RSS
POST   /v1/sessions                          multipart: files ``images`` and/or fields ``paths``; ``item_id``
POST   /v1/sessions/{id}/run                 {"code": "..."} -> {"ok", "stdout", "error", "images": [...]}
GET    /v1/sessions/{id}/images/{name}       the bytes of an image the code saved
DELETE /v1/sessions/{id}                     close the session, delete its files
```
FastAPI and uvicorn are imported here only, so ``import thyme.sandbox`` works without the ``server`` extra.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

try:
    import anyio.to_thread
    from fastapi import Depends, FastAPI, File, Form, Request, UploadFile
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
    from pydantic import BaseModel, Field
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError("the sandbox server needs FastAPI and uvicorn: pip install 'thyme-vlm[server]'") from exc

from ..errors import InvalidInput, SandboxClosed, SandboxError, WorkerCrashed, WorkerError
from ..returned import open_returned_image
from .config import ServerConfig
from .errors import RequestRejected, ServerError, Unauthorized
from .guard import BrowserGuard, allowed_host_names
from .inputs import resolve_server_path, save_uploads
from .limits import BodySizeLimit, deadline_protocol
from .metrics import ServerMetrics, count_workers_alive
from .sessions import SandboxLike, SessionRegistry

logger = logging.getLogger(__name__)

API_PREFIX = "/v1"
SPARE_THREADS = 8  # threads beyond sessions + queue, for image fetches and closes
IMAGE_MIME_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp",
                    ".gif": "image/gif", ".bmp": "image/bmp", ".tif": "image/tiff", ".tiff": "image/tiff"}


class SessionInfo(BaseModel):
    session_id: str
    input_paths: list[str] = Field(description="paths to tell the model; the code can open them read-only")
    scratch_dir: str = Field(description="server folder where the code's images are saved")
    idle_timeout_s: float = Field(description="the session is closed after this long unused")
    run_timeout_s: float = Field(description="wall-clock limit of one run")


class RunRequest(BaseModel):
    code: str = Field(description="Python source, as the model wrote it")


class ImageRef(BaseModel):
    name: str
    path: str = Field(description="the checked copy on the server (its name is the one the code printed)")
    url: str = Field(description="where to GET the image bytes")


class RunResponse(BaseModel):
    ok: bool
    stdout: str
    error: str | None
    images: list[ImageRef]
    repairs: list[str] = Field(description="source repairs applied before the code ran")
    duration_s: float


class ErrorDetail(BaseModel):
    kind: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorDetail


def error_status(exc: SandboxError) -> tuple[int, str]:
    """Maps a sandbox or server error to the HTTP status and the ``kind`` the client turns back into a class."""
    if isinstance(exc, ServerError):
        return exc.status or 500, exc.kind
    if isinstance(exc, InvalidInput):
        return 400, "invalid_input"
    if isinstance(exc, SandboxClosed):
        return 503, "closed"
    if isinstance(exc, WorkerCrashed):
        return 502, "worker_crashed"
    if isinstance(exc, WorkerError):
        return 502, "worker_error"
    return 500, "sandbox_error"


def error_response(status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"kind": kind, "message": message}}, status_code=status, headers=headers)


def _make_sandbox(config: ServerConfig) -> SandboxLike:
    from ..limits import Limits
    from ..local import Sandbox

    return Sandbox(limits=Limits(timeout_s=config.timeout_s, max_pixels=config.max_pixels), pool_size=config.workers)


def create_app(config: ServerConfig, sandbox: SandboxLike | None = None) -> FastAPI:
    """Builds the HTTP app of the sandbox server.

    Args:
        config (`ServerConfig`): limits, token and roots.
        sandbox (`SandboxLike`, *optional*): a pool to serve; the caller keeps ownership. Without one, the app
            starts a ``Sandbox`` with ``config.workers`` workers on startup and closes it on shutdown.

    Returns:
        `FastAPI`: the app, ready for uvicorn or any ASGI server.
    """
    metrics = ServerMetrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Blocking endpoints run in anyio's thread pool (40 threads by default); every open session may be
        # running code while the queue waits, so the pool must be larger than both together, or runs would
        # wait for a thread and "busy" would no longer be the only way to wait.
        limiter = anyio.to_thread.current_default_thread_limiter()
        limiter.total_tokens = max(limiter.total_tokens, (config.max_sessions or 1) + config.max_queue + SPARE_THREADS)
        pool = sandbox if sandbox is not None else _make_sandbox(config)
        app.state.sandbox = pool
        app.state.registry = SessionRegistry(
            pool, metrics, max_sessions=config.max_sessions or 1, max_queue=config.max_queue,
            queue_wait_s=config.queue_wait_s, idle_timeout_s=config.idle_timeout_s,
        )  # fmt: skip
        upload_root = tempfile.TemporaryDirectory(prefix="thyme-server-uploads-")
        app.state.upload_root = Path(upload_root.name)
        try:
            yield
        finally:
            app.state.registry.close_all()
            upload_root.cleanup()
            if sandbox is None:
                pool.close()

    app = FastAPI(
        title="Thyme sandbox server",
        description="Runs model-written Python on images in isolated sessions (crop, zoom, enhance).",
        version="1",
        lifespan=lifespan,
        responses={401: {"model": ErrorResponse}, 503: {"model": ErrorResponse}},
    )
    app.state.config = config
    app.state.metrics = metrics
    app.add_middleware(BodySizeLimit, max_bytes=config.max_request_bytes, on_reject=metrics.record_error)
    # Added last, so it runs first: a browser's request is refused before anything else looks at it.
    app.add_middleware(BrowserGuard, allowed_hosts=allowed_host_names(config.host, config.allowed_hosts),
                       client_header_required=config.token is None, on_reject=metrics.record_error)  # fmt: skip
    _add_error_handlers(app, metrics)
    _add_routes(app, config, metrics)
    return app


def _add_error_handlers(app: FastAPI, metrics: ServerMetrics) -> None:
    @app.exception_handler(SandboxError)
    async def sandbox_error(request: Request, exc: SandboxError) -> JSONResponse:
        status, kind = error_status(exc)
        metrics.record_error(kind)
        headers = {"Retry-After": "2"} if status == 503 else None
        if status == 401:
            headers = {"WWW-Authenticate": "Bearer"}
        return error_response(status, kind, str(exc), headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        metrics.record_error("invalid_input")
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg', '')}" for err in exc.errors()
        )
        return error_response(422, "invalid_input", f"malformed request: {problems}")


def _auth_dependency(config: ServerConfig) -> Any:
    bearer = HTTPBearer(auto_error=False, description="the token given to the server with --token-file")

    # A default rather than Annotated[...]: with postponed annotations FastAPI cannot see the local `bearer`.
    def require_token(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:  # noqa: B008
        if config.token is None:
            return
        if credentials is None:
            raise Unauthorized("this server needs a bearer token: send 'Authorization: Bearer <token>'")
        if not hmac.compare_digest(credentials.credentials.encode(), config.token.encode()):
            raise Unauthorized("wrong bearer token: use the token the server was started with")

    return Depends(require_token)


def _add_routes(app: FastAPI, config: ServerConfig, metrics: ServerMetrics) -> None:
    auth = [_auth_dependency(config)]

    def registry(request: Request) -> SessionRegistry:
        return request.app.state.registry  # type: ignore[no-any-return]

    # async: liveness and metrics must answer even when every worker thread is busy running code.
    @app.get("/healthz", tags=["service"])
    async def healthz(request: Request) -> dict[str, Any]:
        return {"status": "ok", "sessions_open": len(registry(request)), "max_sessions": config.max_sessions,
                "workers_alive": count_workers_alive()}  # fmt: skip

    @app.get("/metrics", tags=["service"], dependencies=auth)
    async def metrics_endpoint(request: Request) -> dict[str, Any]:
        snapshot = metrics.snapshot()
        snapshot.update(sessions_open=len(registry(request)), max_sessions=config.max_sessions,
                        workers_alive=count_workers_alive())  # fmt: skip
        return snapshot

    @app.post(f"{API_PREFIX}/sessions", status_code=201, tags=["sessions"], dependencies=auth)
    def open_session(
        request: Request,
        images: Annotated[list[UploadFile], File(description="image files to upload")] = [],  # noqa: B006
        paths: Annotated[list[str], Form(description="server-side image paths under an allowed root")] = [],  # noqa: B006
        item_id: Annotated[str | None, Form(description="names the item in error messages")] = None,
    ) -> SessionInfo:
        count = len(images) + len(paths)
        if not 1 <= count <= config.max_images_per_session:
            raise RequestRejected(
                f"a session needs 1 to {config.max_images_per_session} images, got {count}: "
                "upload files as 'images' or name server files as 'paths'"
            )
        upload_dir = Path(tempfile.mkdtemp(dir=request.app.state.upload_root))
        try:
            inputs = save_uploads([(f.filename, f.file) for f in images], upload_dir, config.max_pixels)
            inputs += [resolve_server_path(p, config.allowed_roots, config.max_pixels) for p in paths]
            entry = registry(request).open([str(p) for p in inputs], item_id=item_id, upload_dir=upload_dir)
        except BaseException:
            shutil.rmtree(upload_dir, ignore_errors=True)
            raise
        return SessionInfo(session_id=entry.session_id, input_paths=list(entry.session.input_paths),
                           scratch_dir=str(entry.session.scratch_dir), idle_timeout_s=config.idle_timeout_s,
                           run_timeout_s=config.timeout_s)

    @app.post(f"{API_PREFIX}/sessions/{{session_id}}/run", tags=["sessions"], dependencies=auth)
    def run_code(request: Request, session_id: str, body: RunRequest) -> RunResponse:
        if len(body.code) > config.max_code_chars:
            raise RequestRejected(
                f"the code is {len(body.code):,} characters; the server accepts at most {config.max_code_chars:,}",
                kind="code_too_long", status=413,
            )  # fmt: skip
        started = time.monotonic()
        entry, result = registry(request).run(session_id, body.code)
        images = [
            ImageRef(name=Path(p).name, path=str(p), url=f"{API_PREFIX}/sessions/{session_id}/images/{Path(p).name}")
            for p in result.images
        ]
        return RunResponse(ok=result.ok, stdout=result.stdout, error=result.error, images=images,
                           repairs=list(result.repairs), duration_s=round(time.monotonic() - started, 6))  # fmt: skip

    @app.get(f"{API_PREFIX}/sessions/{{session_id}}/images/{{name}}", tags=["sessions"], dependencies=auth,
             response_class=StreamingResponse)  # fmt: skip
    def fetch_image(request: Request, session_id: str, name: str) -> StreamingResponse:
        entry = registry(request).get(session_id)
        path = entry.images.get(name)
        opened = open_returned_image(path) if path is not None else None
        if opened is None:
            raise RequestRejected(
                f"session {session_id!r} has no image {name!r}: fetch one of the names a run returned",
                kind="image_not_found", status=404,
            )  # fmt: skip
        file, size = opened
        return StreamingResponse(_chunks(file), media_type=IMAGE_MIME_TYPES.get(Path(name).suffix.lower()),
                                 headers={"content-length": str(size)})  # fmt: skip

    @app.delete(f"{API_PREFIX}/sessions/{{session_id}}", status_code=204, tags=["sessions"], dependencies=auth)
    def close_session(request: Request, session_id: str) -> Response:
        registry(request).close(session_id)
        return Response(status_code=204)


def _chunks(file: Any, size: int = 1 << 16) -> Any:
    """Streams an open file and closes it (runs in the thread pool: the reads block)."""
    with file:
        while chunk := file.read(size):
            yield chunk


def uvicorn_config(app: Any, config: ServerConfig) -> Any:
    """The uvicorn settings of a sandbox server: its address, and the request deadline of :mod:`.limits`."""
    import uvicorn

    return uvicorn.Config(app, host=config.host, port=config.port, log_level="warning",
                          http=deadline_protocol(config.request_timeout_s))  # fmt: skip


def serve(config: ServerConfig, sandbox: SandboxLike | None = None) -> None:
    """Runs the server on uvicorn until interrupted (``thyme sandbox serve``).

    Raises:
        InvalidInput: the configuration is unsafe or invalid (checked by ``ServerConfig``).
    """
    import uvicorn

    logger.info("sandbox server on http://%s:%d (token %s)", config.host, config.port,
                "required" if config.token else "not required")  # fmt: skip
    uvicorn.Server(uvicorn_config(create_app(config, sandbox), config)).run()
