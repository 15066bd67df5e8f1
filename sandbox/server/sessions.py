"""The open sessions of the tool server: a bounded table with a waiting queue, per-session locks and idle expiry.

Both front ends (the HTTP API in :mod:`.app` and the MCP tools in :mod:`.mcp`) hold sessions through this
class, so limits mean the same thing in both. Its methods block and are called from worker threads (FastAPI runs
plain ``def`` endpoints in a thread pool, the MCP SDK runs plain ``def`` tools with ``anyio.to_thread``); a slow run
in one session therefore never holds up a call on another.
"""

from __future__ import annotations

import logging
import secrets
import shutil
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ..errors import SandboxClosed
from .errors import ServerBusy, SessionNotFound
from .metrics import ServerMetrics

logger = logging.getLogger(__name__)

REAP_INTERVAL_MAX_S = 5.0


class SandboxLike(Protocol):
    """What the registry needs from a pool: the ``Sandbox`` of :mod:`thyme.sandbox` or a ``RemoteSandbox``."""

    def session(self, image: str | None = None, *, images: Sequence[str] | None = None,
                item_id: str | None = None) -> Any: ...  # fmt: skip

    def close(self) -> None: ...


@dataclass
class OpenSession:
    """One session of the table, with what the server keeps beside it."""

    session_id: str
    session: Any  # thyme.sandbox.Session or RemoteSession: input_paths, scratch_dir, run(), close()
    upload_dir: Path | None  # the uploaded inputs, removed on close
    last_used: float = field(default_factory=time.monotonic)
    run_lock: threading.Lock = field(default_factory=threading.Lock)
    images: dict[str, Path] = field(default_factory=dict)  # produced image file name -> path, for fetching


class SessionRegistry:
    """Opens, finds, runs and closes sessions under the server's limits.

    Args:
        sandbox (`SandboxLike`): the pool sessions are opened from.
        metrics (`ServerMetrics`): counters updated on every run and refusal.
        max_sessions (`int`): sessions open at once.
        max_queue (`int`): callers allowed to wait for a slot; one more is told "busy" at once.
        queue_wait_s (`float`): how long a caller waits for a slot before being told "busy".
        idle_timeout_s (`float`): sessions unused for this long are closed by a background thread.
    """

    def __init__(self, sandbox: SandboxLike, metrics: ServerMetrics, *, max_sessions: int, max_queue: int,
                 queue_wait_s: float, idle_timeout_s: float) -> None:  # fmt: skip
        self._sandbox = sandbox
        self._metrics = metrics
        self._max_sessions = max_sessions
        self._max_queue = max_queue
        self._queue_wait_s = queue_wait_s
        self.idle_timeout_s = idle_timeout_s
        self._slots = threading.BoundedSemaphore(max_sessions)
        self._lock = threading.Lock()
        self._sessions: dict[str, OpenSession] = {}
        self._waiting = 0
        self._stop = threading.Event()
        self._reaper = threading.Thread(target=self._reap_forever, name="thyme-session-reaper", daemon=True)
        self._reaper.start()

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)

    def open(self, image_paths: Sequence[str], *, item_id: str | None = None,
             upload_dir: Path | None = None) -> OpenSession:  # fmt: skip
        """Opens a session on the given images, waiting a bounded time for a free slot.

        Raises:
            ServerBusy: every slot stayed taken for ``queue_wait_s``, or the waiting queue is full.
            SandboxError: the pool refused the images (missing, unreadable) or could not start a worker.
        """
        self._acquire_slot()
        try:
            session = self._sandbox.session(images=list(image_paths), item_id=item_id)
        except BaseException:
            self._slots.release()
            raise
        entry = OpenSession(session_id=secrets.token_urlsafe(12), session=session, upload_dir=upload_dir)
        with self._lock:
            self._sessions[entry.session_id] = entry
        self._metrics.record_session_opened()
        return entry

    def _acquire_slot(self) -> None:
        if self._slots.acquire(blocking=False):
            return
        with self._lock:
            if self._waiting >= self._max_queue:
                raise ServerBusy(self._busy_message(f"{self._waiting} requests are already waiting"))
            self._waiting += 1
        self._metrics.change_queue(+1)
        try:
            if not self._slots.acquire(timeout=self._queue_wait_s):
                raise ServerBusy(self._busy_message(f"none came free within {self._queue_wait_s:g} s"))
        finally:
            with self._lock:
                self._waiting -= 1
            self._metrics.change_queue(-1)

    def _busy_message(self, why: str) -> str:
        return (
            f"the sandbox server is busy: all {self._max_sessions} sessions are in use and {why}. "
            "Retry in a few seconds, close sessions you no longer need, or start the server with more --max-sessions"
        )

    def get(self, session_id: str) -> OpenSession:
        """Returns the open session with this id.

        Raises:
            SessionNotFound: no such session: it was closed, expired, or never existed.
        """
        with self._lock:
            entry = self._sessions.get(session_id)
        if entry is None:
            raise SessionNotFound(
                f"session {session_id!r} does not exist: it was closed, or it expired after "
                f"{self.idle_timeout_s:g} s idle. Open a new session"
            )
        return entry

    def run(self, session_id: str, code: str) -> tuple[OpenSession, Any]:
        """Runs ``code`` in the session and records the produced images for fetching.

        Returns:
            `tuple[OpenSession, ExecutionResult]`: the session and the result of the run.

        Raises:
            SessionNotFound: the session is gone.
            ServerBusy: the session is already running code (runs in one session are sequential).
        """
        entry = self.get(session_id)
        if not entry.run_lock.acquire(blocking=False):
            raise ServerBusy(
                f"session {session_id!r} is still running code: wait for that run to return before sending the next",
                kind="session_busy", status=409,
            )  # fmt: skip
        try:
            with self._lock:
                closed = session_id not in self._sessions
            if closed:  # closed or expired between get() and taking the lock
                raise SessionNotFound(f"session {session_id!r} was closed: open a new session")
            started = time.monotonic()
            result = entry.session.run(code)
            self._metrics.record_run(time.monotonic() - started, bool(result.ok))
            for path in result.images:
                entry.images[Path(path).name] = Path(path)
            return entry, result
        finally:
            entry.last_used = time.monotonic()
            entry.run_lock.release()

    def close(self, session_id: str) -> None:
        """Closes the session, frees its slot and deletes its uploads and images.

        A run in progress is let finish first (it is bounded by the sandbox's timeout), so a worker is never torn
        down under a running program.

        Raises:
            SessionNotFound: the session is gone already.
        """
        with self._lock:
            entry = self._sessions.pop(session_id, None)
        if entry is None:
            raise SessionNotFound(f"session {session_id!r} does not exist: it was already closed or expired")
        with entry.run_lock:
            self._dispose(entry)

    def _dispose(self, entry: OpenSession) -> None:
        try:
            entry.session.close()
        except SandboxClosed:
            logger.debug("session %s was closed by its pool already", entry.session_id)
        finally:
            if entry.upload_dir is not None:
                shutil.rmtree(entry.upload_dir, ignore_errors=True)
            self._slots.release()

    def reap_idle(self) -> int:
        """Closes every session idle for longer than ``idle_timeout_s`` and not running; returns how many."""
        deadline = time.monotonic() - self.idle_timeout_s
        expired: list[OpenSession] = []
        with self._lock:
            for entry in list(self._sessions.values()):
                # Claiming the run lock here means no run can start on a session that is being expired.
                if entry.last_used < deadline and entry.run_lock.acquire(blocking=False):
                    del self._sessions[entry.session_id]
                    expired.append(entry)
        for entry in expired:
            logger.info("closing session %s after %.0f s idle", entry.session_id, self.idle_timeout_s)
            try:
                self._dispose(entry)
            finally:
                entry.run_lock.release()
        return len(expired)

    def _reap_forever(self) -> None:
        interval = min(REAP_INTERVAL_MAX_S, self.idle_timeout_s / 4)
        while not self._stop.wait(interval):
            self.reap_idle()

    def close_all(self) -> None:
        """Stops the idle reaper and closes every session (server shutdown)."""
        self._stop.set()
        with self._lock:
            entries = list(self._sessions.values())
            self._sessions.clear()
        for entry in entries:
            self._dispose(entry)
