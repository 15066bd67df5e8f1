"""Warm worker processes, ready before a session asks for one, and replaced in the background once taken."""

from __future__ import annotations

import logging
import shutil
import threading
from collections import deque
from collections.abc import Callable

from thyme.sandbox.errors import SandboxClosed, WorkerError
from thyme.sandbox.process import WorkerProcess

logger = logging.getLogger(__name__)

RETRY_DELAY_S = 2.0
"""Pause after a failed background start, so a broken setup does not spin the CPU."""


class WorkerPool:
    """Keeps ``size`` started workers waiting. A taken worker belongs to one session and is never returned.

    Args:
        start_worker (`Callable[..., WorkerProcess]`): starts one worker (blocking: ~0.5-1 s with exec, ms from a
            zygote); called with ``warm=True`` for the idle workers nobody waits for yet.
        size (`int`): how many idle workers to keep ready.
    """

    def __init__(self, start_worker: Callable[..., WorkerProcess], size: int) -> None:
        self._start_worker = start_worker
        self._size = size
        self._idle: deque[WorkerProcess] = deque()
        self._condition = threading.Condition()
        self._starting = 0
        self._closed = False
        self._filler = threading.Thread(target=self._fill, name="thyme-sandbox-pool", daemon=True)
        self._filler.start()

    def acquire(self) -> WorkerProcess:
        """Takes a ready worker, or starts one now if none is idle; the pool starts a replacement behind it."""
        with self._condition:
            if self._closed:
                raise SandboxClosed("the Sandbox is closed; create a new Sandbox")
            while self._idle:
                worker = self._idle.popleft()
                if worker.alive:
                    self._condition.notify_all()
                    return worker
                discard(worker)
            self._condition.notify_all()
        return self._start_worker()

    def _fill(self) -> None:
        while True:
            with self._condition:
                while not self._closed and len(self._idle) + self._starting >= self._size:
                    self._condition.wait()
                if self._closed:
                    return
                self._starting += 1
            try:
                worker: WorkerProcess | None = self._start_worker(warm=True)
            except SandboxClosed:
                return  # the Sandbox closed while this worker was being started
            except WorkerError as exc:
                logger.warning("sandbox pool: starting a warm worker failed, retrying in %.0f s: %s",
                               RETRY_DELAY_S, exc)
                worker = None
            with self._condition:
                self._starting -= 1
                if worker is not None and not self._closed:
                    self._idle.append(worker)
                    worker = None
                self._condition.notify_all()
                if worker is None and not self._idle and not self._closed:
                    self._condition.wait(RETRY_DELAY_S)
            if worker is not None:
                discard(worker)

    def wait_ready(self, timeout_s: float) -> bool:
        """Blocks until the pool holds ``size`` idle workers (benchmarks, tests); returns whether it does."""
        with self._condition:
            return bool(self._condition.wait_for(lambda: len(self._idle) >= self._size or self._closed, timeout_s))

    def close(self) -> None:
        with self._condition:
            self._closed = True
            idle, self._idle = list(self._idle), deque()
            self._condition.notify_all()
        for worker in idle:
            discard(worker)
        self._filler.join(timeout=30)


def discard(worker: WorkerProcess) -> None:
    """Kills a worker no session took, and deletes the empty session dir it was started for."""
    worker.kill()
    shutil.rmtree(worker.session_dir, ignore_errors=True)
