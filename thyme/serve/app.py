"""The ``thyme serve`` HTTP app: an OpenAI-compatible chat endpoint whose answers come from the Thyme loop.

```
GET  /healthz                         liveness and load (no token needed)
GET  /metrics                         requests, errors by kind, running/waiting, latency percentiles, RSS
GET  /v1/models                       the one model this server answers as
POST /v1/chat/completions             a chat with image parts -> a completion whose content is the final answer
GET  /v1/images/{response_id}/{name}  a crop the sandbox returned, as linked from a response's ``thyme`` field
```

Every route but ``/healthz`` needs ``Authorization: Bearer <token>`` when the server has a token. Every request
passes the sandbox server's :class:`~thyme.sandbox.server.guard.BrowserGuard` (Host, Origin, simple cross-site
posts; its refusals keep that server's ``{"error": {"kind", "message"}}`` shape) and a body-size limit. At most
``max_running`` questions run at once on the one backend and one sandbox pool; up to ``max_queue`` more wait up to
``queue_wait_s`` for a slot (then 503); beyond that a request is refused at once with 429, so a full server answers
rather than hangs. Errors are OpenAI-shaped: ``{"error": {"message", "type", "code"}}``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import shutil
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

try:
    import anyio
    import anyio.to_thread
    from fastapi import FastAPI, Request
    from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError("thyme serve needs FastAPI and uvicorn: pip install 'thyme-vlm[server]'") from exc

from thyme.agent import ThymeAgent
from thyme.config import AgentConfig
from thyme.errors import BackendError, ConfigError, ImageError, ThymeError
from thyme.loop import AttemptStarted, Finished, RolloutResult, SandboxFinished, TextGenerated
from thyme.sandbox.errors import SandboxError
from thyme.sandbox.server.guard import BrowserGuard, allowed_host_names
from thyme.sandbox.server.limits import BodySizeLimit
from thyme.sandbox.server.metrics import ServerMetrics
from thyme.serve.config import ServeConfig
from thyme.serve.inputs import ApiError, ChatInput, http_fetch, parse_chat
from thyme.trajectory import Answer, Code, Prose, SandboxOutput, Trajectory

logger = logging.getLogger(__name__)

AgentFactory = Callable[[AgentConfig], ThymeAgent]
THYME_FIELD = "thyme"  # the extra field of completions and chunks that carries the trajectory
_SAFE_NAME = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


def _error(status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": kind}}, status_code=status,
                        headers=headers)  # fmt: skip


class Admission:
    """Slots for running questions and a bounded queue in front of them (used from the event loop only).

    ``acquire`` refuses at once (429) when ``slots + queue`` requests are already in, and gives up after
    ``wait_s`` in the queue (503); either way the client gets an answer instead of a hung connection.
    """

    def __init__(self, slots: int, queue: int, wait_s: float) -> None:
        self.slots, self.queue, self.wait_s = slots, queue, wait_s
        self.running = self.waiting = 0
        self._semaphore: asyncio.Semaphore | None = None

    async def acquire(self) -> None:
        if self.running + self.waiting >= self.slots + self.queue:
            raise ApiError(429, "server_full", f"the server is full ({self.running} questions running, "
                           f"{self.waiting} waiting): retry later", {"Retry-After": "5"})  # fmt: skip
        if self._semaphore is None:
            self._semaphore = asyncio.Semaphore(self.slots)
        self.waiting += 1
        try:
            await asyncio.wait_for(self._semaphore.acquire(), self.wait_s)
        except TimeoutError as exc:
            raise ApiError(503, "server_busy", f"no slot freed within {self.wait_s:g} s: retry later",
                           {"Retry-After": "10"}) from exc  # fmt: skip
        finally:
            self.waiting -= 1
        self.running += 1

    def release(self) -> None:
        self.running -= 1
        assert self._semaphore is not None
        self._semaphore.release()


class ImageStore:
    """The crops of recent answers, one folder per response, so the URLs in the ``thyme`` field resolve.

    Only the last ``keep`` responses keep their folder: the store cannot fill the disk however long the server runs.
    """

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.root = Path(tempfile.mkdtemp(prefix="thyme-serve-images-"))
        self._folders: OrderedDict[str, Path] = OrderedDict()
        self._lock = threading.Lock()

    def new(self) -> tuple[str, Path]:
        response_id = uuid.uuid4().hex
        folder = self.root / response_id
        folder.mkdir()
        with self._lock:
            self._folders[response_id] = folder
            while len(self._folders) > self.keep:
                _, old = self._folders.popitem(last=False)
                shutil.rmtree(old, ignore_errors=True)
        return response_id, folder

    def get(self, response_id: str, name: str) -> Path | None:
        with self._lock:
            folder = self._folders.get(response_id)
        if folder is None or not name or not set(name) <= _SAFE_NAME or name.startswith("."):
            return None
        path = folder / name
        return path if path.is_file() else None

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


@dataclasses.dataclass
class _Job:
    """One question in flight: its id, its inputs, the agent config and the URL root of its crops."""

    response_id: str
    chat: ChatInput
    config: AgentConfig
    image_root: str
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))

    def url(self, path: str) -> str:
        return f"{self.image_root}/{Path(path).name}"


def _request_config(base: AgentConfig, body: dict[str, Any], images_dir: Path) -> AgentConfig:
    """The server's agent config with the request's ``temperature`` (0: greedy, > 0: ATS prose at that
    temperature), ``seed`` and ``max_tokens`` (tokens per generation call, at most the server's)."""
    changes: dict[str, Any] = {"images_dir": images_dir}
    temperature = body.get("temperature")
    if temperature is not None:
        if not isinstance(temperature, (int, float)) or temperature < 0:
            raise ApiError(400, "invalid_request_error", "'temperature' must be a number >= 0")
        if temperature == 0:
            changes["sampling"] = "greedy"
        else:
            changes.update(sampling="ats", temperature=float(temperature))
    if body.get("seed") is not None:
        changes["seed"] = body["seed"]
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    if limit is not None:
        if not isinstance(limit, int) or limit < 1:
            raise ApiError(400, "invalid_request_error", "'max_tokens' must be a positive integer")
        changes["max_new_tokens"] = min(limit, base.max_new_tokens)
    try:
        return dataclasses.replace(base, **changes)
    except (ConfigError, TypeError) as exc:
        raise ApiError(400, "invalid_request_error", f"bad sampling settings: {exc}") from exc


def steps(trajectory: Trajectory, url: Callable[[str], str]) -> list[dict[str, Any]]:
    """The trajectory as the ``thyme.steps`` list: reasoning, code, sandbox output (crops as URLs), answer."""
    out: list[dict[str, Any]] = []
    for part in trajectory.parts():
        if isinstance(part, Prose):
            out.append({"type": "reasoning", "text": part.text})
        elif isinstance(part, Code):
            out.append({"type": "code", "code": part.code})
        elif isinstance(part, SandboxOutput):
            out.append(_sandbox_step(part, url))
        elif isinstance(part, Answer):
            out.append({"type": "answer", "text": part.answer})
    return out


def _sandbox_step(output: SandboxOutput, url: Callable[[str], str]) -> dict[str, Any]:
    return {"type": "sandbox_output", "images": [url(path) for path in output.images], "text": output.text,
            "error": output.error, "stdout": output.stdout}  # fmt: skip


def _usage(result: RolloutResult) -> dict[str, int]:
    generations = [g for trajectory in result.attempts for g in trajectory.generations]
    prompt = sum(g.prompt_tokens for g in generations)
    completion = sum(len(g.token_ids or ()) for g in generations)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def thyme_field(result: RolloutResult, job: _Job) -> dict[str, Any]:
    """The documented extra field: the outcome, the steps of the answering trajectory, and every crop URL."""
    return {
        "response_id": job.response_id,
        "question": result.trajectory.question,
        "has_answer": result.has_answer,
        "stop_reason": result.stop_reason,
        "used_fallback": result.used_fallback,
        "attempts": len(result.attempts),
        "generation_calls": result.generation_calls,
        "code_runs": result.code_runs,
        "code_errors": result.code_errors,
        "images": [job.url(path) for path in result.trajectory.sandbox_images],
        "steps": steps(result.trajectory, job.url),
    }


def _completion(result: RolloutResult, job: _Job, model: str) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{job.response_id}",
        "object": "chat.completion",
        "created": job.created,
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": result.answer},
                     "finish_reason": "stop", "logprobs": None}],
        "usage": _usage(result),
        THYME_FIELD: thyme_field(result, job),
    }  # fmt: skip


def _chunk(job: _Job, model: str, delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
    body = {"id": f"chatcmpl-{job.response_id}", "object": "chat.completion.chunk", "created": job.created,
            "model": model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
            **extra}  # fmt: skip
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def _sandbox_text(output: SandboxOutput, job: _Job) -> str:
    """The sandbox output as reasoning text for a stream (crops as their URLs)."""
    shown = " ".join(job.url(path) for path in output.images) or output.shown_text
    return f"<sandbox_output>{shown}</sandbox_output>"


def _failure(exc: BaseException) -> ApiError:
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, (ImageError, ConfigError)):
        return ApiError(400, "invalid_request_error", str(exc))
    if isinstance(exc, BackendError):
        return ApiError(502, "backend_error", f"the model backend failed: {exc}")
    if isinstance(exc, SandboxError):
        return ApiError(503, "sandbox_error", f"the sandbox failed: {exc}", {"Retry-After": "10"})
    if isinstance(exc, ThymeError):
        return ApiError(500, "thyme_error", str(exc))
    logger.exception("unexpected error while answering", exc_info=exc)
    return ApiError(500, "internal_error", f"{type(exc).__name__}: {exc}")


def create_app(
    agent_factory: AgentFactory,
    config: ServeConfig,
    base_config: AgentConfig | None = None,
    fetch: Callable[[str, Path], None] | None = None,
) -> FastAPI:
    """Builds the app.

    Args:
        agent_factory: makes the agent for one question from its config; agents share the factory's backend and
            sandbox and are not closed by the app (the factory's owner closes backend and sandbox).
        config: access rules and limits.
        base_config: the agent settings requests start from (a request may change temperature, seed, max_tokens).
        fetch: downloads an allowed http(s) image URL to a path; default: httpx with the config's limits.

    Returns:
        The FastAPI app; ``app.state.close()`` removes the crops folder (call it after the server stops).
    """
    base_config = base_config or AgentConfig()
    metrics = ServerMetrics()
    admission = Admission(config.max_running, config.max_queue, config.queue_wait_s)
    store = ImageStore(config.kept_responses)
    fetch = fetch or http_fetch(config)
    # Threads for the blocking loop (the running questions) and for reading inputs, apart from anyio's default pool.
    runners = anyio.CapacityLimiter(config.max_running)
    readers = anyio.CapacityLimiter(config.max_running + config.max_queue)

    app = FastAPI(title="Thyme agent server", version="1",
                  description="The Thyme agent behind an OpenAI-compatible chat endpoint")  # fmt: skip
    app.state.close = store.close
    app.state.admission = admission
    app.add_middleware(BodySizeLimit, max_bytes=config.max_request_bytes, on_reject=metrics.record_error)
    # The browser guard every Thyme server shares (Host, Origin, simple cross-site posts); with a token the
    # Authorization header a page cannot add cross-site plays the part of the client header.
    hosts = allowed_host_names(config.host, config.allowed_hosts)
    app.add_middleware(BrowserGuard, allowed_hosts=hosts, client_header_required=config.token is None,
                       on_reject=metrics.record_error)  # fmt: skip

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        metrics.record_error(exc.kind)
        return _error(exc.status, exc.kind, exc.message, exc.headers)

    def authorize(request: Request) -> None:
        if config.token is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise ApiError(401, "unauthorized", "this server needs 'Authorization: Bearer <token>' (OPENAI_API_KEY "
                           "for the openai client)", {"WWW-Authenticate": "Bearer"})  # fmt: skip
        if not hmac.compare_digest(token.strip().encode(), config.token.encode()):
            raise ApiError(401, "unauthorized", "wrong bearer token: use the token the server was started with",
                           {"WWW-Authenticate": "Bearer"})  # fmt: skip

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "model": config.model_name, "running": admission.running,
                "waiting": admission.waiting, "max_running": config.max_running}  # fmt: skip

    @app.get("/metrics")
    async def metrics_route(request: Request) -> dict[str, Any]:
        authorize(request)
        snapshot = metrics.snapshot()
        snapshot.pop("sessions_opened", None)
        snapshot.update(
            requests_answered=snapshot.pop("runs"),
            running=admission.running,
            waiting=admission.waiting,
            max_running=config.max_running,
            max_queue=config.max_queue,
        )
        snapshot["queue_length"] = admission.waiting
        return snapshot

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        authorize(request)
        return {"object": "list",
                "data": [{"id": config.model_name, "object": "model", "created": 0, "owned_by": "thyme"}]}  # fmt: skip

    @app.get("/v1/images/{response_id}/{name}")
    async def image(request: Request, response_id: str, name: str) -> FileResponse:
        authorize(request)
        path = store.get(response_id, name)
        if path is None:
            raise ApiError(404, "image_not_found", f"no image {name!r} for response {response_id!r} (only the last "
                           f"{config.kept_responses} responses keep their images)")  # fmt: skip
        return FileResponse(path)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ApiError(400, "invalid_request_error", f"the body is not JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise ApiError(400, "invalid_request_error", "the body must be a JSON object (a chat completion request)")
        if body.get("n", 1) != 1:
            raise ApiError(400, "invalid_request_error", "n must be 1: each completion is one full agent run")
        await admission.acquire()
        chat: ChatInput | None = None
        try:
            chat = await anyio.to_thread.run_sync(parse_chat, body, config, fetch, limiter=readers)
            response_id, folder = store.new()
            root = str(request.base_url).rstrip("/") + f"/v1/images/{response_id}"
            job = _Job(response_id, chat, _request_config(base_config, body, folder), root)
        except BaseException as exc:  # a cancelled request too: the slot must come back
            if chat is not None:
                chat.cleanup()
            admission.release()
            if isinstance(exc, Exception):
                raise _failure(exc) from exc
            raise
        if body.get("stream"):
            return StreamingResponse(_start_stream(job), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})  # fmt: skip
        try:
            started = time.monotonic()
            result = await anyio.to_thread.run_sync(_answer, job, limiter=runners)
            metrics.record_run(time.monotonic() - started, ok=True)
        except Exception as exc:
            raise _failure(exc) from exc
        finally:
            job.chat.cleanup()
            admission.release()
        return _completion(result, job, config.model_name)

    def _agent_events(job: _Job):
        agent = agent_factory(job.config)
        images = [str(path) for path in job.chat.images]
        return agent.stream(images if len(images) > 1 else images[0], job.chat.question, item_id=job.response_id[:8])

    def _answer(job: _Job) -> RolloutResult:
        for event in _agent_events(job):
            if isinstance(event, Finished):
                return event.result
        raise AssertionError("the loop ended without a Finished event")  # unreachable: run_rollout always finishes

    def _start_stream(job: _Job) -> AsyncIterator[str]:
        """Starts the loop in a thread now and returns the SSE chunks of its events. The thread, not the response,
        owns the slot and the inputs: they are released even if the response is never iterated (a client gone
        before the first byte). A client that goes away stops the run after the current step (the loop's sandbox
        session is closed as the event generator closes)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()
        started = time.monotonic()

        def produce() -> None:
            events = None
            try:
                events = _agent_events(job)
                for event in events:
                    loop.call_soon_threadsafe(queue.put_nowait, event)
                    if stop.is_set():
                        break
            except BaseException as exc:  # noqa: BLE001 - handed to the stream, which reports it to the client
                loop.call_soon_threadsafe(queue.put_nowait, exc)
            finally:
                if events is not None:
                    events.close()
                job.chat.cleanup()
                loop.call_soon_threadsafe(admission.release)
                loop.call_soon_threadsafe(queue.put_nowait, None)

        threading.Thread(target=produce, name=f"thyme-serve-{job.response_id[:8]}", daemon=True).start()
        model = config.model_name

        async def chunks() -> AsyncIterator[str]:
            try:
                yield _chunk(job, model, {"role": "assistant", "content": ""})
                while (event := await queue.get()) is not None:
                    if isinstance(event, BaseException):
                        failure = _failure(event)
                        metrics.record_error(failure.kind)
                        error = {"error": {"message": failure.message, "type": failure.kind}}
                        yield f"data: {json.dumps(error)}\n\n"
                        continue
                    for text in _stream_pieces(event, job, model):
                        yield text
                    if isinstance(event, Finished):
                        metrics.record_run(time.monotonic() - started, ok=True)
                yield "data: [DONE]\n\n"
            finally:
                stop.set()

        return chunks()

    def _stream_pieces(event: Any, job: _Job, model: str) -> list[str]:
        if isinstance(event, AttemptStarted) and (event.attempt > 1 or event.fallback):
            label = "the plain fallback prompt" if event.fallback else f"attempt {event.attempt}"
            note = {"type": "attempt", "attempt": event.attempt, "fallback": event.fallback}
            return [_chunk(job, model, {"reasoning_content": f"\n[no answer yet: {label}]\n"}, **{THYME_FIELD: note})]
        if isinstance(event, TextGenerated):
            return [_chunk(job, model, {"reasoning_content": event.segment.text})]
        if isinstance(event, SandboxFinished) and not event.hidden:
            step = _sandbox_step(event.output, job.url)
            return [_chunk(job, model, {"reasoning_content": _sandbox_text(event.output, job)}, **{THYME_FIELD: step})]
        if isinstance(event, Finished):
            result = event.result
            return [
                _chunk(job, model, {"content": result.answer}),
                _chunk(job, model, {}, "stop", usage=_usage(result), **{THYME_FIELD: thyme_field(result, job)}),
            ]
        return []

    return app


def scripted_factory(script: str | Path, sandbox: Any) -> AgentFactory:
    """Agents replaying ``script`` (a fresh replay per question: a replay is used up) in the shared sandbox."""
    from thyme.backends.scripted import ScriptedBackend, load_script

    segments = load_script(script)  # read once: a bad file fails at startup, not on the first request
    return lambda config: ThymeAgent(ScriptedBackend(segments), config, sandbox=sandbox)


def shared_factory(backend: Any, sandbox: Any) -> AgentFactory:
    """Agents sharing one backend and one sandbox pool (each question still gets its own sandbox session)."""
    return lambda config: ThymeAgent(backend, config, sandbox=sandbox)


__all__ = ["THYME_FIELD", "Admission", "AgentFactory", "ImageStore", "create_app", "scripted_factory",
           "shared_factory", "steps", "thyme_field"]  # fmt: skip
