"""The worker process: started warm by the pool, then serves one session and is thrown away.

Run as ``python -I -m thyme.sandbox.worker LIMITS_JSON``. Start-up, in order:

1. keep the protocol pipes (stdin/stdout) on private fds and point fds 0-2 at /dev/null, so that C code printing
   to stdout cannot corrupt the protocol;
2. cut the network with a new network namespace (``unshare``): as root directly, otherwise inside a new user
   namespace where the kernel allows it; report what held;
3. import cv2, numpy and PIL (the warm part, ~0.5 s that a session no longer waits for);
4. as root, drop to the ``nobody`` user, so the file-system permissions (and RLIMIT_NPROC) bind the code;
5. apply the rlimits: address space, file size, open files, no new processes, no core files;
6. announce ``ready`` and serve JSON-line requests: ``open`` (chdir to the scratch dir, build the namespace) and
   ``run`` (one code block; the CPU rlimit is re-armed for each).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import resource
import sys
from typing import Any, BinaryIO

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
NOBODY_UID = 65534
NOBODY_GID = 65534


def _cut_network() -> str:
    """Moves the process into a fresh network namespace (only a down loopback device) and says how."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if libc.unshare(CLONE_NEWNET) == 0:
        return "network namespace"
    if libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) == 0:
        return "user+network namespace"
    return f"not isolated (unshare failed: {os.strerror(ctypes.get_errno())})"


WARM_MODULES = (
    "cv2", "numpy", "numpy.linalg", "numpy.random", "numpy.fft", "numpy.polynomial", "numpy.ma", "PIL.Image",
    "PIL.ImageEnhance", "PIL.ImageFilter", "PIL.ImageOps", "PIL.ImageDraw", "PIL.ImageFont", "PIL.ImageStat",
    "PIL.ImageChops", "PIL.ImageColor", "PIL.ImageSequence", "PIL.ImageTransform", "PIL.ExifTags",
    "collections", "datetime", "_strptime", "decimal", "fractions", "itertools", "json", "math", "cmath", "random",
    "re", "statistics", "time", "string", "uuid", "functools", "_string",
    "encodings.ascii", "encodings.latin_1", "encodings.utf_16", "encodings.utf_32", "encodings.idna",
    "thyme.sandbox.execution",
)
"""Imported before the worker gives up root: afterwards the Python install may be unreadable (a pyenv under
/root is), and these are what the code reaches. A later lazy import that fails is an ImportError for the code."""


def _warm_imports() -> None:
    import importlib

    for name in WARM_MODULES:
        importlib.import_module(name)
    import cv2
    from PIL import Image

    Image.init()  # loads every image plugin now; PIL would otherwise import them on the first open
    cv2.setNumThreads(1)  # no thread pool: RLIMIT_NPROC=0 forbids new threads as well as processes


def _drop_privileges() -> str:
    if os.geteuid() != 0:
        return f"uid {os.geteuid()}"
    os.setgroups([])
    os.setgid(NOBODY_GID)
    os.setuid(NOBODY_UID)
    return "nobody (dropped from root)"


def _apply_limits(limits: Any) -> None:
    mib = 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limits.memory_mb * mib, limits.memory_mb * mib))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_size_mb * mib, limits.file_size_mb * mib))
    resource.setrlimit(resource.RLIMIT_NOFILE, (limits.open_files, limits.open_files))
    resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def isolate(limits: Any) -> dict[str, str]:
    """Steps 2-5 of the start-up: no network, warm imports, no root, rlimits. Returns what held, in words.

    Tests call this in a bare interpreter to prove the process layer holds without the language policy.
    """
    network = _cut_network()
    _warm_imports()
    user = _drop_privileges()
    _apply_limits(limits)
    return {"network": network, "user": user}


def _arm_cpu_limit(seconds: int) -> None:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    used = int(usage.ru_utime + usage.ru_stime) + 1
    hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
    soft = used + seconds
    resource.setrlimit(resource.RLIMIT_CPU, (soft if hard == resource.RLIM_INFINITY else min(soft, hard), hard))


def _send(channel: BinaryIO, message: dict[str, Any]) -> None:
    channel.write(json.dumps(message).encode() + b"\n")
    channel.flush()


def main(argv: list[str]) -> int:
    requests = os.fdopen(os.dup(0), "rb")
    replies = os.fdopen(os.dup(1), "wb")
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)

    from thyme.sandbox.limits import Limits

    limits = Limits(**json.loads(argv[0]))
    report = isolate(limits)
    from thyme.sandbox.execution import CodeRunner
    from thyme.sandbox.repair import RepairConfig

    _send(replies, dict(report, ready=True, pid=os.getpid()))
    runner: CodeRunner | None = None
    for line in requests:
        request = json.loads(line)
        if request["op"] == "open":
            os.chdir(request["scratch_dir"])
            runner = CodeRunner(request["scratch_dir"], dict(request["inputs"]), RepairConfig(**request["repairs"]),
                                limits)
            _send(replies, {"input_error": runner.input_error, "image_size": runner.image_size})
        elif request["op"] == "run" and runner is not None:
            _arm_cpu_limit(limits.cpu_seconds)
            _send(replies, runner.run(request["code"]))
        else:
            _send(replies, {"protocol_error": f"unexpected request {request.get('op')!r}"})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
