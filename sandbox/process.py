"""The parent's handle on one worker process: start it (inside bubblewrap where it can), exchange JSON lines with a
deadline, and trust none of it: a reply must carry the request's nonce, be the only one, and the worker must have
stopped itself after it (SIGSTOP, checked in /proc) before the reply counts; it is continued with the next request."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import secrets
import select
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from thyme.sandbox import bubblewrap
from thyme.sandbox.errors import WorkerCrashed, WorkerError
from thyme.sandbox.isolation import Isolation, summarize
from thyme.sandbox.limits import Limits

if TYPE_CHECKING:  # imported when used: `python -m thyme.sandbox.zygote` must not find it imported already
    from thyme.sandbox.zygote import Zygote

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 60.0
"""Time a worker may take to import cv2/numpy/PIL and report ready (generous: the machine may be busy)."""

STOP_TIMEOUT_S = 5.0
"""Time a worker may take, after writing its reply, to stop itself (microseconds normally; a busy machine may
deschedule it). Past it, code is taken to be running on after its reply: the worker is killed."""

WORKER_UID_BASE = 100_000
"""As root, a worker runs as uid ``WORKER_UID_BASE + pid`` of the process the parent started for it: no two live
workers share a uid, so one session's code cannot touch another's files, and RLIMIT_NPROC counts only this worker."""

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


class ProtocolViolation(WorkerError):
    """The worker answered outside the protocol (a reply the parent did not ask for, or one without its nonce, or
    it kept running after replying): code in it took it over. It has been killed."""


class _Spawner:
    """Starts every worker from one long-lived thread.

    bubblewrap's ``--die-with-parent`` and the worker's PR_SET_PDEATHSIG fire when the *thread* that started the
    process exits, not the process: a worker started from a short-lived thread (an HTTP request handler) would be
    killed with it. One thread that lives as long as the interpreter makes "dies with the parent" mean the process.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[tuple[list[str], dict[str, Any], Future[subprocess.Popen[bytes]]]] = (
            queue.SimpleQueue())
        self._thread: threading.Thread | None = None

    def popen(self, argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():  # not started, or this is a forked child
                self._queue = queue.SimpleQueue()
                self._thread = threading.Thread(target=self._serve, args=(self._queue,), name="thyme-sandbox-spawner",
                                                daemon=True)
                self._thread.start()
            done: Future[subprocess.Popen[bytes]] = Future()
            self._queue.put((argv, kwargs, done))
        return done.result()

    @staticmethod
    def _serve(requests: queue.SimpleQueue[tuple[list[str], dict[str, Any], Future[subprocess.Popen[bytes]]]]) -> None:
        while True:
            argv, kwargs, done = requests.get()
            try:
                done.set_result(subprocess.Popen(argv, **kwargs))  # noqa: S603 - our own worker command line
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
                done.set_exception(exc)


_SPAWNER = _Spawner()


class WorkerProcess:
    """One started worker, serving the session dir it was started for. Not thread-safe: a session serialises its
    requests.

    Args:
        limits (`Limits`): applied by the worker as rlimits.
        session_dir (`str`): the session's dir (``inputs/`` and ``scratch/`` must exist); the only one it sees.
        isolation (`Isolation`): which OS layers to use.
        language_layer (`bool`, defaults to `True`): ``False`` runs plain ``exec`` (tests of the OS layers alone).
        zygote (`Zygote`, *optional*): fork the worker from this fork server instead of starting an interpreter.
        rehearse (`bool`, defaults to `False`): a forked worker runs a typical code block once before it is ready.
    """

    def __init__(self, limits: Limits, session_dir: str, isolation: Isolation, *, language_layer: bool = True,
                 zygote: Zygote | None = None, rehearse: bool = False) -> None:
        self.limits = limits
        self.session_dir = session_dir
        self._buffer = b""
        weak_reason = isolation.check()
        if zygote is not None:
            self._fork(zygote, rehearse)
        else:
            self._spawn(worker_config(limits, isolation, language_layer, weak_reason, session_dir), weak_reason)
        # One uid per live worker: the pid of the process the parent started is unique while the worker lives.
        self.uid: int = WORKER_UID_BASE + self.process.pid if os.geteuid() == 0 else os.getuid()
        try:
            self._write({"uid": self.uid})
            hello = self._read(START_TIMEOUT_S, nonce=None)
        except (WorkerError, OSError) as exc:
            self.kill()
            raise WorkerCrashed(f"a sandbox worker failed to start: {exc}") from exc
        finally:
            if self._info_fd >= 0:
                os.close(self._info_fd)
                self._info_fd = -1
        if "startup_error" in hello:
            self.kill()
            raise WorkerCrashed(f"a sandbox worker failed to isolate itself: {hello['startup_error']}")
        self.pid: int = self._host_pid if self._host_pid is not None else int(hello["pid"])
        """The worker's PID as this process sees it (inside bubblewrap it is 2 in its own PID namespace)."""
        self.isolation: dict[str, str] = summarize(hello, weak_reason)

    def _fork(self, zygote: Zygote, rehearse: bool) -> None:
        try:
            self.process: Any = zygote.fork(self.session_dir, START_TIMEOUT_S, rehearse=rehearse)
        except OSError as exc:
            raise WorkerCrashed(f"the sandbox zygote could not fork a worker: {exc}") from exc
        self._info_fd = -1
        self._wrapped = False
        self._host_pid: int | None = self.process.pid

    def _spawn(self, config: dict[str, Any], weak_reason: str | None) -> None:
        session_dir = self.session_dir
        # TMPDIR: the scratch dir is the only writable place (libraries that ask tempfile for a dir get it).
        env = worker_env(self.limits, os.path.join(session_dir, "scratch"))
        argv = [sys.executable, "-I", "-m", "thyme.sandbox.worker", json.dumps(config)]
        info_read, pass_fds = -1, ()
        if weak_reason is None:
            info_read, info_write = os.pipe()
            pass_fds = (info_write,)
            command = bubblewrap.command(str(bubblewrap.executable()), session_dir, keep_setuid=os.geteuid() == 0,
                                         info_fd=info_write)
            argv = [*command, "--", *argv]
        try:
            self.process = _SPAWNER.popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=session_dir,
                env=env, start_new_session=True, pass_fds=pass_fds,
            )
        except OSError as exc:
            if info_read >= 0:
                os.close(info_read)
            raise WorkerError(f"could not start a sandbox worker with {argv[0]}: {exc}") from exc
        finally:
            for fd in pass_fds:
                os.close(fd)
        self._info_fd = info_read
        self._wrapped = weak_reason is None
        self._host_pid = None if weak_reason is None else self.process.pid

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def request(self, message: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        """Sends one request, continues the stopped worker, and waits for its reply and its stop.

        Raises:
            ExecutionTimedOut: no reply within ``timeout_s``; the worker has been killed.
            WorkerDied: the worker exited; ``returncode`` says how.
            ProtocolViolation: the reply was forged or the worker kept running after it; it has been killed.
        """
        nonce = secrets.token_hex(16)
        try:
            self._write(dict(message, nonce=nonce))
        except BrokenPipeError as exc:
            raise self._died() from exc
        if self._host_pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._host_pid, signal.SIGCONT)
        return self._read(timeout_s, nonce=nonce)

    def _write(self, message: dict[str, Any]) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(message).encode() + b"\n")
        self.process.stdin.flush()

    def _read(self, timeout_s: float, nonce: str | None) -> dict[str, Any]:
        """Reads one reply line, then waits until the worker has stopped itself and checks nothing followed it."""
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
                raise ProtocolViolation(f"a sandbox worker sent more than {MAX_REPLY_BYTES} bytes in one reply")
        line, _, self._buffer = self._buffer.partition(b"\n")
        try:
            reply = json.loads(line)
        except ValueError:
            reply = None
        if not isinstance(reply, dict) or reply.get("nonce") != nonce:
            self.kill()
            raise ProtocolViolation(f"the sandbox process sent a reply that is not the protocol: {line[:200]!r}")
        if nonce is None and "startup_error" in reply:
            return reply  # the worker is killed by the caller: whether it stopped does not matter
        self._wait_stopped(max(STOP_TIMEOUT_S, deadline - time.monotonic()))
        if self._buffer or select.select([fd], [], [], 0)[0]:
            self.kill()
            raise ProtocolViolation("the sandbox process sent more than one reply")
        return reply

    def _wait_stopped(self, timeout_s: float) -> None:
        """Blocks until the worker is stopped (it stops itself right after a reply); kills it if it keeps running.

        This is what lets the parent read a run's images knowing no code of that run still executes.
        """
        if self._host_pid is None:
            self._host_pid = self._find_worker_pid()
        if not os.path.exists("/proc/self/stat"):
            return  # no /proc (macOS): the stop cannot be observed; docs/sandbox.md says so
        deadline = time.monotonic() + timeout_s
        pause = 0.0002
        while True:
            state = _process_state(self._host_pid)
            if state in ("T", "t"):
                return
            if state in (None, "Z", "X"):
                raise self._died()
            if time.monotonic() > deadline:
                self.kill()
                raise ProtocolViolation(
                    f"the sandbox process kept running {timeout_s:g} s after its reply (code took over its reply)")
            time.sleep(pause)
            pause = min(pause * 2, 0.02)

    def _find_worker_pid(self) -> int:
        try:
            return bubblewrap.sandboxed_pid(self._info_fd)
        except FileNotFoundError as exc:  # bubblewrap's init exited: the worker is gone
            raise self._died() from exc
        except OSError as exc:
            raise WorkerError(str(exc)) from exc

    def _died(self) -> WorkerDied:
        try:
            code = self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.kill()
            code = self.process.returncode
        if self._wrapped and code is not None and code > 128:
            code = 128 - code  # bubblewrap exits with 128 + the signal that killed the worker
        return WorkerDied(describe_exit(code), code)

    def kill(self) -> None:
        """Kills the worker (and bubblewrap around it, through its process group) and reaps it."""
        if self.process.poll() is None:
            if self._host_pid is not None and self._host_pid != self.process.pid:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(self._host_pid, signal.SIGKILL)
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


def worker_config(limits: Limits, isolation: Isolation, language_layer: bool, weak_reason: str | None,
                  session_dir: str | None) -> dict[str, Any]:
    """What the worker (or the zygote) is told to do: limits, which layers, the read-only paths."""
    return {"limits": limits.to_dict(), "session_dir": session_dir, "namespaces": _namespaces(isolation, weak_reason),
            "landlock": isolation.landlock, "seccomp": isolation.seccomp, "language_layer": language_layer,
            "read_only": bubblewrap.read_only_paths()}


def worker_env(limits: Limits, tmpdir: str) -> dict[str, str]:
    return dict(CLEAN_ENV, OPENCV_IO_MAX_IMAGE_PIXELS=str(limits.max_pixels), TMPDIR=tmpdir)


def start_zygote(limits: Limits, root: str, isolation: Isolation, *, language_layer: bool) -> Zygote:
    """Starts the fork server for a Sandbox's work dir ``root`` (inside bubblewrap where it can run)."""
    weak_reason = isolation.check()
    config = worker_config(limits, isolation, language_layer, weak_reason, None)
    command = None
    if weak_reason is None:
        bwrap = str(bubblewrap.executable())

        def command(info_fd: int) -> list[str]:
            return bubblewrap.command(bwrap, root, keep_setuid=os.geteuid() == 0, info_fd=info_fd, zygote=True)

    from thyme.sandbox.zygote import Zygote

    try:
        return Zygote(config, root, worker_env(limits, root), command, _SPAWNER.popen, START_TIMEOUT_S)
    except OSError as exc:
        raise WorkerCrashed(f"the sandbox zygote failed to start: {exc}") from exc


def _namespaces(isolation: Isolation, weak_reason: str | None) -> str:
    """``bubblewrap``; else, where bubblewrap was wanted but cannot run, the worker's own ``unshare`` fallback."""
    if weak_reason is None:
        return "bubblewrap"
    return "unshare" if isolation.bubblewrap else "none"


def _process_state(pid: int) -> str | None:
    """The one-letter state in /proc/PID/stat (R, S, D, T...), or None once the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            data = stat.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return data[data.rindex(b")") + 2:][:1].decode()


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
