"""The worker process: started warm by the pool, then serves one session and is thrown away.

Run as ``python -I -m thyme.sandbox.worker LIMITS_JSON`` with the sandbox's dir as cwd. Start-up, in order:

1. keep the protocol pipes (stdin/stdout) on private fds and point fds 0-2 at /dev/null, so that C code printing
   to stdout cannot corrupt the protocol;
2. enter new network and mount namespaces (``unshare``): as root directly, otherwise inside a new user namespace
   where the kernel allows it. No interface is up, so no connection can be made; every mount is remounted
   read-only except the sandbox's own dir (the cwd);
3. import cv2, numpy, PIL and what the facades use (the warm part, ~0.5 s that a session no longer waits for);
4. as root, drop to a uid of its own, so file permissions (and RLIMIT_NPROC) bind the code;
5. apply the rlimits: address space, file size, open files, no new processes or threads, no core files;
6. announce ``ready`` with what held, and serve JSON-line requests: ``open`` (chdir to the scratch dir, build the
   namespace) and ``run`` (one code block; the CPU rlimit is re-armed for each).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import resource
import sys
from typing import Any, BinaryIO

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC, MS_PRIVATE, MS_RELATIME = 1024, 2048, 4096, 16384, 1 << 18, 1 << 21
_KEPT_MOUNT_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": MS_NOATIME,
                     "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME}
WARM_UP_NICENESS = 19
WORKER_UID_BASE = 100_000
"""As root, a worker runs as uid ``WORKER_UID_BASE + its pid``: no two live workers share a uid, so one session's
code cannot touch another session's scratch dir, and RLIMIT_NPROC counts only this worker."""

WARM_MODULES = (
    "cv2", "numpy", "numpy.linalg", "numpy.random", "numpy.fft", "numpy.polynomial", "PIL.Image",
    "PIL.ImageEnhance", "PIL.ImageFilter", "PIL.ImageOps", "PIL.ImageDraw", "PIL.ImageFont", "PIL.ImageStat",
    "PIL.ImageChops", "PIL.ImageColor", "PIL.ImageSequence", "PIL.ImageTransform", "PIL.ExifTags",
    "collections", "datetime", "_strptime", "decimal", "fractions", "itertools", "json", "math", "cmath", "random",
    "re", "statistics", "time", "string", "uuid", "functools", "_string", "heapq", "bisect", "copy", "copyreg",
    "operator", "textwrap", "struct", "base64", "hashlib", "zlib", "binascii", "io", "numbers", "enum", "typing",
    "dataclasses", "abc", "weakref", "contextlib", "locale", "calendar", "pprint", "keyword", "unicodedata",
    "colorsys", "reprlib", "difflib", "array", "fnmatch", "warnings", "traceback", "linecache", "tokenize",
    "encodings.ascii", "encodings.latin_1", "encodings.utf_16", "encodings.utf_32", "encodings.idna",
    "encodings.cp1252", "thyme.sandbox.execution",
)
"""Imported before the worker gives up root: afterwards the Python install may be unreadable (a pyenv under
/root is), and the standard library imports some modules lazily (``Counter.most_common`` imports heapq). A lazy
import that still fails later is an ImportError for the code; docs/sandbox.md says how to avoid it."""


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def _unshare() -> tuple[bool, str]:
    """Enters new network and mount namespaces; says whether the mount namespace is ours and what held."""
    libc = _libc()
    if libc.unshare(CLONE_NEWNET | CLONE_NEWNS) == 0:
        return True, "network namespace (no interface up)"
    if libc.unshare(CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWNS) == 0:
        return True, "user+network namespace (no interface up)"
    return False, f"not isolated (unshare failed: {os.strerror(ctypes.get_errno())})"


def _read_only_filesystem(writable_dir: str) -> str:
    """Remounts every file system read-only in this process's private mount namespace, except ``writable_dir``.

    The sandbox's own dir (sessions' scratch dirs and input copies) stays writable through a bind mount; file
    permissions decide there: input copies are root-owned and 0444, and each scratch dir belongs to one worker.
    """
    libc = _libc()
    if libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        return f"writable (mount propagation: {os.strerror(ctypes.get_errno())})"
    target = writable_dir.encode()
    if libc.mount(target, target, None, MS_BIND | MS_REC, None) != 0:
        return f"writable (bind mount of {writable_dir}: {os.strerror(ctypes.get_errno())})"
    with open("/proc/self/mountinfo") as mountinfo:
        mounts = [line.split() for line in mountinfo]
    failed = []
    for fields in mounts:
        point = fields[4].encode().decode("unicode_escape")
        if point == writable_dir or point.startswith(writable_dir.rstrip("/") + "/"):
            continue
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY
        for option in fields[5].split(","):
            flags |= _KEPT_MOUNT_FLAGS.get(option, 0)
        if libc.mount(None, point.encode(), None, flags, None) != 0:
            failed.append(point)
    if failed:
        return f"read-only except {writable_dir}, but {len(failed)} mount(s) stayed writable: {failed[:5]}"
    return f"read-only except {writable_dir}"


def _warm_imports() -> None:
    import importlib

    for name in WARM_MODULES:
        importlib.import_module(name)
    import cv2
    from PIL import Image

    Image.init()  # loads every image plugin now; PIL would otherwise import them on the first open
    cv2.setNumThreads(1)  # no thread pool: RLIMIT_NPROC=0 forbids new threads as well as processes
    _exercise_libraries()


def _exercise_libraries() -> None:
    """Runs typical operations once, in memory, so the modules they load lazily are loaded while still readable."""
    import collections
    import datetime
    import io

    import cv2
    import numpy as np
    from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont, ImageOps

    pixels = np.zeros((8, 8, 3), np.uint8)
    for extension in (".jpg", ".png", ".bmp", ".webp", ".tiff"):
        cv2.imdecode(cv2.imencode(extension, pixels)[1], cv2.IMREAD_COLOR)
    image = Image.fromarray(pixels)
    for image_format in ("JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF"):
        buffer = io.BytesIO()
        image.save(buffer, image_format)
        Image.open(io.BytesIO(buffer.getvalue())).load()
    ImageDraw.Draw(image).text((0, 0), "x", font=ImageFont.load_default())
    ImageOps.autocontrast(ImageEnhance.Contrast(image.filter(ImageFilter.SHARPEN)).enhance(1.5))
    repr(np.arange(4.0)), np.pad(pixels, 1), np.percentile(pixels, 50), np.histogram(pixels)
    np.linalg.svd(np.eye(2)), np.random.default_rng(0).random(2), np.unique(pixels), np.isclose(1.0, 1.0)
    collections.Counter("ab").most_common(1)
    datetime.datetime.strptime("2024-01-02", "%Y-%m-%d").strftime("%c")
    f"{1.5:.2f} {10**20:,} {3:e}"

def _drop_privileges() -> str:
    if os.geteuid() != 0:
        return f"uid {os.geteuid()} (not root: nothing to drop)"
    uid = WORKER_UID_BASE + os.getpid()
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    return f"uid {uid} (dropped from root)"


def _apply_limits(limits: Any) -> str:
    """Sets the rlimits; says which ones the OS refused (macOS has no RLIMIT_AS, for one)."""
    mib = 1024 * 1024
    wanted = {
        "address space": (resource.RLIMIT_AS, limits.memory_mb * mib),
        "file size": (resource.RLIMIT_FSIZE, limits.file_size_mb * mib),
        "open files": (resource.RLIMIT_NOFILE, limits.open_files),
        "processes": (resource.RLIMIT_NPROC, 0),
        "core files": (resource.RLIMIT_CORE, 0),
    }
    refused = []
    for name, (which, value) in wanted.items():
        try:
            resource.setrlimit(which, (value, value))
        except (ValueError, OSError):
            refused.append(name)
    return "all set" if not refused else f"not set: {', '.join(refused)}"


def isolate(limits: Any, writable_dir: str) -> dict[str, Any]:
    """Steps 2-5 of the start-up: no network, read-only files but ``writable_dir``, warm imports, no root, rlimits.

    Tests call this in a bare interpreter to prove that the process layer holds without the language policy.

    Returns:
        `dict`: ``network``, ``files``, ``user`` and ``rlimits`` say in words what held; ``uid`` is the uid the
        code runs as.
    """
    niceness = os.getpriority(os.PRIO_PROCESS, 0)
    if os.geteuid() == 0:
        # Warm up at the lowest priority, so a replacement worker started behind a taken one does not slow the code
        # running in that one; root may raise the priority back afterwards (another user could not).
        os.setpriority(os.PRIO_PROCESS, 0, WARM_UP_NICENESS)
    own_mounts, network = _unshare()
    files = _read_only_filesystem(writable_dir) if own_mounts else "writable (no mount namespace)"
    _warm_imports()
    if os.geteuid() == 0:
        os.setpriority(os.PRIO_PROCESS, 0, niceness)
    user = _drop_privileges()
    rlimits = _apply_limits(limits)
    return {"network": network, "files": files, "user": user, "rlimits": rlimits, "uid": os.getuid()}


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
    report = isolate(limits, os.getcwd())
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
