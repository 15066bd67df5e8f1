"""The parent's handle on one worker process: start it, exchange JSON lines with a deadline, kill it."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import signal
import subprocess
import sys
import time
from typing import Any

from thyme.sandbox.errors import WorkerCrashed, WorkerError
from thyme.sandbox.limits import Limits

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 60.0
"""Time a worker may take to import cv2/numpy/PIL and report ready (generous: the machine may be busy)."""

MAX_REPLY_BYTES = 16 * 1024 * 1024
"""A reply longer than this is not the protocol (stdout is capped far below it); the worker is killed."""

CLEAN_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "LANG": "C.UTF-8",
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "PYTHONDONTWRITEBYTECODE": "1",
}
"""The worker's whole environment: nothing of the parent's (API keys, tokens) is inherited."""


class ExecutionTimedOut(WorkerError):
    """The worker did not answer within the deadline and was killed."""


class WorkerDied(WorkerCrashed):
    """The worker exited while serving a request (rlimit signal, segfault, memory)."""

    def __init__(self, message: str, returncode: int | None) -> None:
        super().__init__(message)
        self.returncode = returncode


class WorkerProcess:
    """One started worker. Not thread-safe: a session serialises its requests."""

    def __init__(self, limits: Limits, cwd: str) -> None:
        env = dict(CLEAN_ENV, OPENCV_IO_MAX_IMAGE_PIXELS=str(limits.max_pixels))
        self.limits = limits
        self._buffer = b""
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-I", "-m", "thyme.sandbox.worker", json.dumps(limits.to_dict())],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=cwd, env=env,
                start_new_session=True,
            )
        except OSError as exc:
            raise WorkerError(f"could not start a sandbox worker with {sys.executable}: {exc}") from exc
        try:
            hello = self._read(START_TIMEOUT_S)
        except (ExecutionTimedOut, WorkerDied) as exc:
            self.kill()
            raise WorkerCrashed(f"a sandbox worker failed to start: {exc}") from exc
        self.pid: int = int(hello["pid"])
        self.uid: int = int(hello["uid"])
        self.isolation: dict[str, str] = {key: str(hello[key]) for key in ("network", "files", "user", "rlimits")}

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def request(self, message: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        """Sends one request and waits for its reply.

        Raises:
            ExecutionTimedOut: no reply within ``timeout_s``; the worker has been killed.
            WorkerDied: the worker exited; ``returncode`` says how.
        """
        assert self.process.stdin is not None
        try:
            self.process.stdin.write(json.dumps(message).encode() + b"\n")
            self.process.stdin.flush()
        except BrokenPipeError as exc:
            raise self._died() from exc
        return self._read(timeout_s)

    def _read(self, timeout_s: float) -> dict[str, Any]:
        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.kill()
                raise ExecutionTimedOut(f"no answer within {timeout_s:g} s")
            ready, _, _ = select.select([fd], [], [], remaining)
            if not ready:
                continue
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                raise self._died()
            self._buffer += chunk
            if len(self._buffer) > MAX_REPLY_BYTES:
                self.kill()
                raise WorkerError(f"a sandbox worker sent more than {MAX_REPLY_BYTES} bytes in one reply")
        line, _, self._buffer = self._buffer.partition(b"\n")
        try:
            reply = json.loads(line)
        except ValueError as exc:
            self.kill()
            raise WorkerError(f"a sandbox worker broke the protocol: {line[:200]!r}") from exc
        if not isinstance(reply, dict):
            self.kill()
            raise WorkerError(f"a sandbox worker broke the protocol: {line[:200]!r}")
        return reply

    def _died(self) -> WorkerDied:
        try:
            code = self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.kill()
            code = self.process.returncode
        return WorkerDied(describe_exit(code), code)

    def kill(self) -> None:
        """Kills the worker (and anything it started, through its process group) and reaps it."""
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                self.process.kill()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            logger.warning("sandbox worker %s did not exit after SIGKILL", self.process.pid)
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None:
                with contextlib.suppress(BrokenPipeError):  # unsent bytes to a dead worker: nothing to deliver
                    pipe.close()


def describe_exit(returncode: int | None) -> str:
    """Says in words why a worker exited, naming the limit when a signal points at one."""
    if returncode is None or returncode >= 0:
        return f"the sandbox process exited (code {returncode})"
    number = -returncode
    reasons = {
        signal.SIGXCPU: "it used up its CPU time limit",
        signal.SIGXFSZ: "it wrote a file over the file size limit",
        signal.SIGSEGV: "it crashed (segmentation fault, often memory exhaustion in a C library)",
        signal.SIGKILL: "it was killed",
        signal.SIGABRT: "it aborted (often a failed memory allocation in a C library)",
    }
    name = signal.Signals(number).name if number in signal.Signals._value2member_map_ else str(number)
    reason = reasons.get(signal.Signals(number), "killed by a signal") if name != str(number) else "killed by a signal"
    return f"the sandbox process stopped with {name}: {reason}"
