"""A fork server: one process imports and exercises cv2/numpy/PIL once, then forks a worker per session in ~ms.

bubblewrap can only wrap an ``exec``, so the zygote itself runs inside bubblewrap (the same namespaces and
read-only view as a worker's, but with the Sandbox's whole work dir bound), and each forked child then enters the
isolation that is its own: Landlock on its session dir only (so it cannot see its siblings' dirs, nor signal
them), seccomp, its own uid as root, the rlimits, fresh random state, no fd but its two protocol pipes. The
parent uses it only where Landlock can scope signals (ABI 6+): without Landlock the children would share one view.

The children share the zygote's memory pages until they write them (copy-on-write), so 64 workers cost far less
than 64 interpreters with their own copies of the libraries. If the zygote dies its children die with it
(PR_SET_PDEATHSIG): their sessions' runs fail cleanly, and the Sandbox starts a new zygote for the next worker.

Control channel: a SOCK_SEQPACKET socket pair. The parent sends ``{"session_dir", "seq"}`` with the child's two
pipe ends attached (SCM_RIGHTS); the zygote answers ``{"forked": pid, "seq"}`` and later ``{"exited": pid,
"code"}`` when it reaps the child.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
from typing import Any

from thyme.sandbox import bubblewrap

logger = logging.getLogger(__name__)

MAX_MESSAGE = 65536


class Forked:
    """A worker forked by the zygote, with the part of ``subprocess.Popen`` that ``WorkerProcess`` uses."""

    def __init__(self, zygote: Zygote, ns_pid: int, pid: int, stdin: Any, stdout: Any) -> None:
        self._zygote = zygote
        self._ns_pid = ns_pid
        self.pid = pid
        self.stdin = stdin
        self.stdout = stdout
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self._zygote.exit_code(self._ns_pid)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        code = self._zygote.wait_exit(self._ns_pid, timeout)
        if code is None:
            raise subprocess.TimeoutExpired("sandbox worker", timeout or 0)
        self.returncode = code
        return code

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(self.pid, signal.SIGKILL)


class Zygote:
    """The parent's handle on the fork server. Thread-safe: sessions fork from it concurrently.

    Args:
        config (`dict`): the worker config (limits, layers, read-only paths) without ``session_dir``.
        root (`str`): the Sandbox's work dir, under which every session dir is made.
        bubblewrap_command (`list[str]` or `None`): bwrap's argument list binding ``root`` (None: no bubblewrap).
    """

    def __init__(self, config: dict[str, Any], root: str, env: dict[str, str],
                 bubblewrap_command: list[str] | None, spawn: Any, start_timeout_s: float) -> None:
        self._lock = threading.Lock()
        self._condition = threading.Condition()
        self._forked: dict[int, int] = {}
        self._exited: dict[int, int] = {}
        self._seq = 0
        self._closed = False
        self._control, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        config = dict(config, root=root, control_fd=child_end.fileno())
        argv = [sys.executable, "-I", "-m", "thyme.sandbox.zygote", json.dumps(config)]
        info_read, pass_fds = -1, [child_end.fileno()]
        if bubblewrap_command is not None:
            info_read, info_write = os.pipe()
            pass_fds.append(info_write)
            argv = [*bubblewrap_command(info_write), "--", *argv]
        try:
            self.process = spawn(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, cwd=root, env=env, start_new_session=True,
                                 pass_fds=tuple(pass_fds))
        finally:
            child_end.close()
            for fd in pass_fds[1:]:
                os.close(fd)
        self._wrapped = bubblewrap_command is not None
        try:
            self._control.settimeout(start_timeout_s)
            hello = json.loads(self._control.recv(MAX_MESSAGE) or b"null")
            self._control.settimeout(None)
            if not isinstance(hello, dict) or not hello.get("ready"):
                raise OSError(f"the sandbox zygote did not start: {hello!r}")
            self.report: dict[str, str] = hello["report"]
            self.pid = bubblewrap.sandboxed_pid(info_read) if self._wrapped else self.process.pid
        except BaseException:
            self.close()
            raise
        finally:
            if info_read >= 0:
                os.close(info_read)
        self._reader = threading.Thread(target=self._read_control, name="thyme-sandbox-zygote", daemon=True)
        self._reader.start()

    @property
    def alive(self) -> bool:
        return not self._closed and self.process.poll() is None

    def fork(self, session_dir: str, timeout_s: float, *, rehearse: bool = False) -> Forked:
        """Forks a worker for ``session_dir``; it then waits for its uid on its request pipe, like a started one."""
        request_read, request_write = os.pipe()
        reply_read, reply_write = os.pipe()
        try:
            with self._lock:
                self._seq += 1
                seq = self._seq
                request = {"session_dir": session_dir, "seq": seq, "rehearse": rehearse}
                socket.send_fds(self._control, [json.dumps(request).encode()], [request_read, reply_write])
        except OSError:
            for fd in (request_read, request_write, reply_read, reply_write):
                os.close(fd)
            raise
        finally:
            with contextlib.suppress(OSError):
                os.close(request_read)
                os.close(reply_write)
        with self._condition:
            if not self._condition.wait_for(lambda: seq in self._forked or not self.alive, timeout_s):
                raise OSError(f"the sandbox zygote did not fork within {timeout_s:g} s")
            if seq not in self._forked:
                raise OSError("the sandbox zygote died")
            ns_pid = self._forked.pop(seq)
        host_pid = self._host_pid(ns_pid) if self._wrapped else ns_pid
        return Forked(self, ns_pid, host_pid, os.fdopen(request_write, "wb"), os.fdopen(reply_read, "rb"))

    def _host_pid(self, ns_pid: int) -> int:
        """The PID this process sees for the zygote's child ``ns_pid`` (the zygote has its own PID namespace)."""
        with open(f"/proc/{self.pid}/task/{self.pid}/children") as children:
            candidates = children.read().split()
        for candidate in candidates:
            with contextlib.suppress(FileNotFoundError):
                with open(f"/proc/{candidate}/status") as status:
                    for line in status:
                        if line.startswith("NSpid:") and int(line.split()[-1]) == ns_pid:
                            return int(candidate)
        raise OSError(f"the zygote's child {ns_pid} is not among its children")

    def exit_code(self, ns_pid: int) -> int | None:
        with self._condition:
            if ns_pid in self._exited:
                return self._exited[ns_pid]
        return None if self.alive else -signal.SIGKILL  # a dead zygote's children were killed with it

    def wait_exit(self, ns_pid: int, timeout: float | None) -> int | None:
        with self._condition:
            self._condition.wait_for(lambda: ns_pid in self._exited or not self.alive, timeout)
        return self.exit_code(ns_pid)

    def _read_control(self) -> None:
        while True:
            try:
                message = self._control.recv(MAX_MESSAGE)
            except OSError:
                message = b""
            with self._condition:
                if not message:
                    self._closed = True
                    self._condition.notify_all()
                    return
                event = json.loads(message)
                if "forked" in event:
                    self._forked[int(event["seq"])] = int(event["forked"])
                elif "exited" in event:
                    self._exited[int(event["exited"])] = int(event["code"])
                self._condition.notify_all()

    def close(self) -> None:
        """Kills the zygote; its children die with it."""
        self._closed = True
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)
        self._control.close()
        with self._condition:
            self._condition.notify_all()


# --- the zygote process -------------------------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    from thyme.sandbox import worker

    config = json.loads(argv[0])
    control = socket.socket(fileno=config["control_fd"])
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    worker._libc().prctl(worker.PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    report = worker.enter_namespaces(config, config["root"])
    if config["namespaces"] == "bubblewrap":
        report["namespaces"] = ("bubblewrap around the zygote: own mount, PID, network, IPC and UTS namespaces; "
                                "only the Python install, the system libraries and the Sandbox's work dir exist")
        report["files"] = (f"only the Python install, system libraries and {config['root']}; Landlock narrows it to "
                           "this session's dir")
    else:
        report["namespaces"] += " (around the zygote)"
    worker.warm_up()
    gc.freeze()  # the warm objects move out of the collector's reach: its passes in a child do not copy their pages
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    control.send(json.dumps({"ready": True, "report": report}).encode())
    while True:
        ready, _, _ = select.select([control, wake_read], [], [])
        if wake_read in ready:
            os.read(wake_read, 4096)
            _reap(control)
        if control in ready:
            message, fds, _, _ = socket.recv_fds(control, MAX_MESSAGE, 2)
            if not message:
                return 0  # the parent closed the channel
            request = json.loads(message)
            pid = os.fork()
            if pid == 0:
                _child(config, report, request, fds, [control.fileno(), wake_read, wake_write])
            for fd in fds:
                os.close(fd)
            control.send(json.dumps({"forked": pid, "seq": request["seq"]}).encode())


def _reap(control: socket.socket) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        control.send(json.dumps({"exited": pid, "code": os.waitstatus_to_exitcode(status)}).encode())


def _child(config: dict[str, Any], report: dict[str, Any], request: dict[str, Any], fds: list[int],
           zygote_fds: list[int]) -> None:
    """Runs in the forked child and never returns: drops everything of the zygote, then serves like a worker."""
    code = 1
    try:
        import random

        import numpy as np

        from thyme.sandbox import worker

        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for fd in zygote_fds:
            os.close(fd)
        requests_fd, replies_fd = fds
        _close_all_but({0, 1, 2, requests_fd, replies_fd})
        worker._libc().prctl(worker.PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # dies with the zygote
        random.seed()  # siblings must not draw the zygote's sequence: fresh state from os.urandom
        np.random.seed()
        session_dir = request["session_dir"]
        os.chdir(session_dir)
        os.environ["TMPDIR"] = os.path.join(session_dir, "scratch")
        child_config = dict(config, session_dir=session_dir)
        if request.get("rehearse") and config["language_layer"]:
            # At the lowest priority, like an exec worker's warm-up: the pool refills while a session runs.
            niceness = os.getpriority(os.PRIO_PROCESS, 0)
            if os.geteuid() == 0:
                os.setpriority(os.PRIO_PROCESS, 0, worker.WARM_UP_NICENESS)
            _rehearse(os.path.join(session_dir, "scratch"), child_config["limits"])
            if os.geteuid() == 0:
                os.setpriority(os.PRIO_PROCESS, 0, niceness)
        code = worker.serve(child_config, os.fdopen(requests_fd, "rb"), os.fdopen(replies_fd, "wb"),
                            lambda uid: worker.confine(child_config, uid, report))
    except BaseException as exc:  # noqa: BLE001 - told to the parent as a start-up error, then the child exits
        with contextlib.suppress(OSError):
            os.write(fds[1], json.dumps({"startup_error": f"{type(exc).__name__}: {exc}"}).encode() + b"\n")
    finally:
        os._exit(code)


REHEARSAL = (
    "import cv2\nimg = cv2.imread(image_path)\ncrop = img[100:400, 100:500]\n"
    "big = cv2.resize(crop, None, fx=2, fy=2, interpolation=cv2.INTER_CUBIC)\n"
    "path = temp_output_dir + 'rehearsal.jpg'\ncv2.imwrite(path, big)\nprint(path)\n"
)
"""A typical code block (the README example's shape), run once by a warm child on a synthetic image."""


def _rehearse(scratch: str, limits: dict[str, Any]) -> None:
    """Runs :data:`REHEARSAL` in a throwaway runner, then empties the scratch dir again.

    A forked child shares the zygote's pages until it writes them; the first run of a session writes thousands
    (reference counts, caches), each a copy-on-write fault. A warm child pays them here, before any session waits
    on it, and copies only the pages a typical run touches (so most memory stays shared).
    """
    import shutil

    import cv2
    import numpy as np

    from thyme.sandbox.execution import CodeRunner
    from thyme.sandbox.limits import Limits
    from thyme.sandbox.repair import RepairConfig

    image = os.path.join(scratch, "rehearsal-input.png")
    try:
        cv2.imwrite(image, np.full((1024, 1024, 3), 127, np.uint8))  # buffers of a real photo size
        CodeRunner(scratch, {image: image}, RepairConfig(), Limits(**limits)).run(REHEARSAL)
    finally:
        for name in os.listdir(scratch):
            path = os.path.join(scratch, name)
            shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.unlink(path)


def _close_all_but(keep: set[int]) -> None:
    low = 0
    for fd in sorted(keep):
        if fd > low:  # closerange(n, n) is not empty: CPython passes n-1 to close_range, which closes every fd
            os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, os.sysconf("SC_OPEN_MAX"))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
