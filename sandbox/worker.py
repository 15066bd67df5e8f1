"""The worker process: started warm by the pool for one session dir, serves that session, and is thrown away.

Run as ``python -I -m thyme.sandbox.worker CONFIG_JSON`` with the session dir as cwd, normally inside bubblewrap
(:mod:`thyme.sandbox.bubblewrap`: own mount/PID/network/IPC namespaces, only the Python install, the system
libraries and this session dir visible). Start-up, in order:

1. keep the protocol pipes (stdin/stdout) on private fds and point fds 0-2 at /dev/null, so that C code printing
   to stdout cannot corrupt the protocol; die with the parent (PR_SET_PDEATHSIG); read the uid to run as;
2. without bubblewrap, enter new network and mount namespaces (``unshare``) where the kernel allows it, and remount
   every mount read-only but the session dir (a weaker fallback: host files and processes stay visible);
3. import cv2, numpy, PIL and what the facades use (the warm part, ~0.5 s that a session no longer waits for);
4. Landlock (:mod:`thyme.sandbox.landlock`): read-only the Python install and system libraries, the inputs; read-write
   the scratch dir; nothing else, no TCP, no signals outside; this also holds where bubblewrap is absent;
5. seccomp (:mod:`thyme.sandbox.seccomp`): no sockets, exec, ptrace, namespaces or mounts;
6. as root, drop to the uid the parent chose (one per live worker), so file permissions and RLIMIT_NPROC bind;
7. apply the rlimits: address space, file size, open files, no new processes or threads, no core files;
8. announce ``ready`` with what held, then serve JSON-line requests: ``open`` (chdir to the scratch dir, build the
   namespace) and ``run`` (one code block; the CPU rlimit is re-armed for each).

After each reply the worker stops itself (SIGSTOP); the parent reads the reply only once the process is stopped,
and continues it (SIGCONT) with the next request. So no code of a run executes while the parent looks at its
results (a timer or a hijacked reply function that keeps running is caught: the worker never stops, the parent kills
it and fails the run).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import json
import os
import resource
import signal
import sys
from collections.abc import Callable
from typing import Any, BinaryIO

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC, MS_PRIVATE, MS_RELATIME = 1024, 2048, 4096, 16384, 1 << 18, 1 << 21
_KEPT_MOUNT_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": MS_NOATIME,
                     "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME}
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
WARM_UP_NICENESS = 19

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
    "encodings.cp1252", "thyme.sandbox.execution", "thyme.sandbox.ablation",
    "socket",  # not importable by model code; the ablation attacks use it where a pyenv under /root is unreadable
)
"""Imported before the worker gives up root: afterwards the Python install may be unreadable (a pyenv under
/root is), and the standard library imports some modules lazily (``Counter.most_common`` imports heapq). A lazy
import that still fails later is an ImportError for the code; docs/sandbox.md says how to avoid it."""


@functools.lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL:
    """Loaded once: ``find_library`` runs ldconfig in a subprocess, which a zygote's child must not (and a
    confined worker cannot) start."""
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

def _drop_privileges(uid: int) -> str:
    if os.geteuid() != 0:
        return f"uid {os.geteuid()} (not root: nothing to drop)"
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


def _no_new_privileges() -> str:
    if _libc().prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        return f"not set ({os.strerror(ctypes.get_errno())})"
    return "set"


def isolate(config: dict[str, Any], uid: int) -> dict[str, Any]:
    """Steps 2-7 of the start-up, as ``config`` (built by the parent) says.

    Returns:
        `dict`: per layer, in words, what held (``namespaces``, ``network``, ``files``, ``landlock``, ``seccomp``,
        ``user``, ``no_new_privs``, ``rlimits``), and ``uid``, the uid the code runs as.
    """
    report = enter_namespaces(config, config["session_dir"])
    warm_up()
    return confine(config, uid, report)


def enter_namespaces(config: dict[str, Any], visible_dir: str) -> dict[str, Any]:
    """Step 2: says what bubblewrap gave, or enters the fallback namespaces with ``visible_dir`` left writable."""
    report: dict[str, Any] = {}
    if config["namespaces"] == "bubblewrap":
        report["namespaces"] = ("bubblewrap: own mount, PID, network, IPC and UTS namespaces; only the Python "
                                "install, the system libraries and this session's dir exist")
        report["network"] = "network namespace (no interface up)"
        report["files"] = f"only the Python install, system libraries and {visible_dir} (inputs read-only)"
    elif config["namespaces"] == "none":
        report["namespaces"] = "off: host files and processes are visible to this layer"
        report["network"] = "not isolated (namespaces off)"
        report["files"] = "host view (namespaces off)"
    else:
        own_mounts, report["network"] = _unshare()
        report["files"] = _read_only_filesystem(visible_dir) if own_mounts else "writable (no mount namespace)"
        report["namespaces"] = ("fallback: " + report["network"] + "; host files and processes stay visible"
                                if own_mounts else "none: host files and processes are visible")
    return report


def warm_up() -> None:
    """Step 3, at the lowest priority as root, so a replacement worker started behind a taken one does not slow the
    code running in that one; root may raise the priority back afterwards (another user could not)."""
    niceness = os.getpriority(os.PRIO_PROCESS, 0)
    if os.geteuid() == 0:
        os.setpriority(os.PRIO_PROCESS, 0, WARM_UP_NICENESS)
    _warm_imports()
    if os.geteuid() == 0:
        os.setpriority(os.PRIO_PROCESS, 0, niceness)


def confine(config: dict[str, Any], uid: int, report: dict[str, Any]) -> dict[str, Any]:
    """Steps 4-7 for ``config["session_dir"]``: Landlock, seccomp, the uid, the rlimits; adds what held."""
    from thyme.sandbox import landlock, seccomp
    from thyme.sandbox.limits import Limits

    session_dir = config["session_dir"]
    parent = os.getppid()
    report = dict(report, no_new_privs=_no_new_privileges())
    if config["landlock"]:
        scratch = os.path.join(session_dir, "scratch")
        report["landlock"] = landlock.restrict_self([*config["read_only"], os.path.join(session_dir, "inputs")],
                                                    [scratch])
    else:
        report["landlock"] = "off"
    report["seccomp"] = seccomp.install() if config["seccomp"] else "off"
    report["user"] = _drop_privileges(uid)
    # Again after the uid change, which clears the parent-death signal: a stopped worker must not outlive its
    # parent (the Sandbox, or the zygote it was forked from).
    _libc().prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)
    report["rlimits"] = _apply_limits(Limits(**config["limits"]))
    report["uid"] = os.getuid()
    return report


def _arm_cpu_limit(seconds: int) -> None:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    used = int(usage.ru_utime + usage.ru_stime) + 1
    hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
    soft = used + seconds
    resource.setrlimit(resource.RLIMIT_CPU, (soft if hard == resource.RLIM_INFINITY else min(soft, hard), hard))


def _send(channel: BinaryIO, message: dict[str, Any]) -> None:
    """Writes one reply and stops this process until the parent continues it with the next request."""
    channel.write(json.dumps(message).encode() + b"\n")
    channel.flush()
    os.kill(os.getpid(), signal.SIGSTOP)


def protocol_fds() -> tuple[BinaryIO, BinaryIO]:
    """Step 1: the protocol pipes on private fds, fds 0-2 on /dev/null, death with the parent."""
    requests = os.fdopen(os.dup(0), "rb")
    replies = os.fdopen(os.dup(1), "wb")
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    _libc().prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # a stopped worker must not outlive its parent
    return requests, replies


def serve(config: dict[str, Any], requests: BinaryIO, replies: BinaryIO,
          isolate_as: Callable[[int], dict[str, Any]]) -> int:
    """Reads the uid, isolates (``isolate_as(uid)``), says ``ready``, then serves ``open`` and ``run``."""
    uid = int(json.loads(requests.readline())["uid"])
    try:
        report = isolate_as(uid)
    except Exception as exc:  # noqa: BLE001 - told to the parent, which raises WorkerCrashed with it
        _send(replies, {"startup_error": f"{type(exc).__name__}: {exc}"})
        return 1
    from thyme.sandbox.limits import Limits
    from thyme.sandbox.repair import RepairConfig

    limits = Limits(**config["limits"])
    _send(replies, dict(report, ready=True, pid=os.getpid()))
    runner: Any = None
    for line in requests:
        request = json.loads(line)
        nonce = request.get("nonce")
        if request["op"] == "open":
            os.chdir(request["scratch_dir"])
            inputs = dict(request["inputs"])
            if config["language_layer"]:
                from thyme.sandbox.execution import CodeRunner

                runner = CodeRunner(request["scratch_dir"], inputs, RepairConfig(**request["repairs"]), limits)
            else:
                from thyme.sandbox.ablation import PlainRunner

                runner = PlainRunner(request["scratch_dir"], inputs)
            reply = {"input_error": runner.input_error, "image_size": runner.image_size}
        elif request["op"] == "run" and runner is not None:
            _arm_cpu_limit(limits.cpu_seconds)
            reply = runner.run(request["code"])
        else:
            reply = {"protocol_error": f"unexpected request {request.get('op')!r}"}
        _send(replies, dict(reply, nonce=nonce))
    return 0


def main(argv: list[str]) -> int:
    requests, replies = protocol_fds()
    config = json.loads(argv[0])
    return serve(config, requests, replies, lambda uid: isolate(config, uid))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
