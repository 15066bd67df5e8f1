"""Reads the header of an image the parent did not write, in a small child process with bounded time and memory.

An image a run returns (or a client uploads) is hostile data: PIL parses some formats far past the header to
learn the size (an ICO decodes the PNG it wraps, a TIFF reads every strip offset, a PNG walks every chunk before
the pixels), so a file of a few MB can cost the reader 650 MB or many seconds. Bounding that in the caller's
process is not possible (no per-call memory limit exists in Python), so the header is read here, in a child that:

- gets the file as an open descriptor over a Unix socket (it needs no file system access at all);
- imports only PIL, accepts only the formats the sandbox returns (``formats=``: an ICO wrapping a PNG is refused
  before its parser runs), refuses sizes over the pixel limit and animations, and never decodes pixels;
- runs under RLIMIT_AS (``CHECK_MEMORY_MB``), no new processes, no file writes, and, when the parent is root,
  as an unprivileged uid;
- is killed by the parent past ``CHECK_TIMEOUT_S``; a killed child is replaced on the next check.

The caller's memory does not move, whatever the file holds, and a bomb costs at most ``CHECK_TIMEOUT_S``. A few
children are kept warm (one per concurrent check), since starting one costs ~0.2 s.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

CHECK_TIMEOUT_S = 3.0
"""Wall-clock seconds one header check may take (a real header takes well under 10 ms)."""

CHECK_MEMORY_MB = 256
"""Address space of the checker child; Python with PIL imported takes ~40 MiB of it."""

START_TIMEOUT_S = 30.0
MAX_IDLE_CHECKERS = 4
NOBODY_UID = 65534
ALLOWED_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP")
"""What PIL may identify a returned or uploaded file as: the formats the sandbox returns (``IMAGE_EXTENSIONS``).
Anything else (ICO, EPS, PSD...) is refused before its parser runs."""

_CLEAN_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}


@dataclass(frozen=True)
class ImageHeader:
    """What the header says: PIL's format name and the size in pixels."""

    format: str
    width: int
    height: int


class ImageCheckFailed(Exception):
    """The file is not an image the sandbox hands out.

    Attributes:
        kind (`str`): ``not_an_image``, ``too_large`` (over the pixel limit), ``animated`` (more than one frame:
            the model is shown one image) or ``bomb`` (the header read ran out of time or memory).
        detail (`str`): the parser's own words for ``not_an_image``, else empty.
        size (`tuple[int, int]` or `None`): width and height, when the header gave them.
    """

    def __init__(self, kind: str, detail: str = "", size: tuple[int, int] | None = None) -> None:
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind
        self.detail = detail
        self.size = size


class _Checker:
    """One checker child and the parent's end of its socket."""

    def __init__(self) -> None:
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.socket = parent_end
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-I", "-m", "thyme.sandbox.image_check", str(child_end.fileno())],
                pass_fds=[child_end.fileno()], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, env=_CLEAN_ENV, start_new_session=True,
            )  # fmt: skip
        finally:
            child_end.close()
        self._buffer = b""
        ready = self._read(START_TIMEOUT_S)
        if ready is None or not ready.get("ready"):
            self.kill()
            raise OSError("the image checker process did not start")

    def check(self, fd: int, request: dict[str, Any], timeout_s: float) -> dict[str, Any] | None:
        """Sends ``fd`` and returns the child's answer, or ``None`` when it died or ran past ``timeout_s``."""
        try:
            socket.send_fds(self.socket, [json.dumps(request).encode() + b"\n"], [fd])
        except OSError:
            return None
        return self._read(timeout_s)

    def _read(self, timeout_s: float) -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self.socket], [], [], remaining)[0]:
                return None
            chunk = self.socket.recv(65536)
            if not chunk or len(self._buffer) > 65536:
                return None
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        try:
            answer = json.loads(line)
        except ValueError:
            return None
        return answer if isinstance(answer, dict) else None

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)
        self.socket.close()


_idle: list[_Checker] = []
_lock = threading.Lock()


def _forget_after_fork() -> None:
    """A forked process (a data loader, an eval worker) must not share its parent's checkers: their answers would
    cross. It starts its own on first use."""
    global _lock
    _lock = threading.Lock()
    _idle.clear()


def check_image(fd: int, max_pixels: int, *, allow_animated: bool = False,
                timeout_s: float | None = None) -> ImageHeader:  # fmt: skip
    """Reads the header of the open file ``fd`` in a bounded child.

    Args:
        fd (`int`): an open, readable descriptor of a regular file (its offset is not used).
        max_pixels (`int`): the largest width x height accepted.
        allow_animated (`bool`, defaults to `False`): accept a file with several frames (an input image: the
            worker reads its first frame); a returned image must be one picture.
        timeout_s (`float`, *optional*): how long the child may take; defaults to ``CHECK_TIMEOUT_S``.

    Returns:
        `ImageHeader`: format and size.

    Raises:
        ImageCheckFailed: not an image of an allowed format, over the pixel limit, or the check ran out of time or
            memory (a parse bomb); ``kind`` says which. ``describe`` words it for a person or a model.
    """
    with _lock:
        checker = _idle.pop() if _idle else None
    if checker is None:
        checker = _Checker()
    request = {"max_pixels": max_pixels, "allow_animated": allow_animated}
    answer = checker.check(fd, request, CHECK_TIMEOUT_S if timeout_s is None else timeout_s)
    if answer is None:
        checker.kill()
        raise ImageCheckFailed("bomb")
    with _lock:
        if len(_idle) < MAX_IDLE_CHECKERS:
            _idle.append(checker)
            checker = None
    if checker is not None:
        checker.kill()
    if "kind" in answer:
        size = answer.get("size")
        raise ImageCheckFailed(
            str(answer["kind"]), str(answer.get("detail", "")), (int(size[0]), int(size[1])) if size else None
        )
    return ImageHeader(str(answer["format"]), int(answer["width"]), int(answer["height"]))


def describe(failure: ImageCheckFailed, what: str, max_pixels: int) -> str:
    """One line for a failed check, e.g. ``what="The saved image 'crop.png'"``."""
    if failure.kind == "too_large":
        size = f" is {failure.size[0]}x{failure.size[1]}," if failure.size else " has"
        return f"{what}{size} more pixels than the limit of {max_pixels}."
    if failure.kind == "animated":
        return f"{what} is an animation (more than one frame): save a single image."
    if failure.kind == "bomb":
        return (
            f"{what} could not be read within {CHECK_TIMEOUT_S:g} s and {CHECK_MEMORY_MB} MiB: it is not a plain "
            "image (a decompression or parse bomb?)."
        )
    return f"{what} is not a readable image ({failure.detail})."


def close_checkers() -> None:
    """Stops the idle checker children (they also exit on their own when this process ends)."""
    with _lock:
        idle, _idle[:] = list(_idle), []
    for checker in idle:
        checker.kill()


os.register_at_fork(after_in_child=_forget_after_fork)
atexit.register(close_checkers)


# ---- the child -------------------------------------------------------------------------------------------------


def _prepare_child() -> None:
    """Imports and exercises PIL's allowed plugins, then gives up everything a header read does not need."""
    import io
    import resource

    from PIL import Image

    Image.init()
    for image_format in ALLOWED_FORMATS:  # lazily imported helpers load now, while the install is readable
        buffer = io.BytesIO()
        Image.new("RGB", (2, 2)).save(buffer, image_format)
        Image.open(io.BytesIO(buffer.getvalue()), formats=ALLOWED_FORMATS).size  # noqa: B018
    if os.geteuid() == 0:
        os.setgroups([])
        os.setgid(NOBODY_UID)
        os.setuid(NOBODY_UID)
    mib = 1024 * 1024
    for which, value in (
        (resource.RLIMIT_AS, CHECK_MEMORY_MB * mib),
        (resource.RLIMIT_NPROC, 0),
        (resource.RLIMIT_FSIZE, 0),
        (resource.RLIMIT_CORE, 0),
        (resource.RLIMIT_NOFILE, 16),
    ):
        with contextlib.suppress(ValueError, OSError):  # macOS lacks RLIMIT_AS; the wall clock still holds
            resource.setrlimit(which, (value, value))


def _read_header(fd: int, max_pixels: int, allow_animated: bool) -> dict[str, Any]:
    from PIL import Image, UnidentifiedImageError

    # PIL's own bomb check is off: it hides the size from the error line, and this process is the bound anyway.
    Image.MAX_IMAGE_PIXELS = None
    try:
        with os.fdopen(fd, "rb") as file, Image.open(file, formats=ALLOWED_FORMATS) as image:
            width, height = image.size
            image_format = str(image.format)
            # Seeks to the second frame only; counting frames would walk the whole file.
            animated = not allow_animated and bool(getattr(image, "is_animated", False))
    except UnidentifiedImageError:
        return {"kind": "not_an_image", "detail": "not a PNG, JPEG, BMP, GIF, TIFF or WebP file"}
    except MemoryError:
        return {"kind": "bomb"}
    except Exception as exc:  # noqa: BLE001 - any parser failure on hostile bytes means "not a readable image"
        return {"kind": "not_an_image", "detail": f"{type(exc).__name__}: {exc}"[:300]}
    if width * height > max_pixels:
        return {"kind": "too_large", "size": [width, height]}
    if animated and not allow_animated:
        return {"kind": "animated"}
    return {"format": image_format, "width": width, "height": height}


def main(argv: list[str]) -> int:
    channel = socket.socket(fileno=int(argv[0]))
    _prepare_child()
    channel.sendall(b'{"ready": true}\n')
    while True:
        message, fds, _, _ = socket.recv_fds(channel, 4096, 1)
        if not message:
            return 0
        request = json.loads(message)
        answer = (_read_header(fds[0], int(request["max_pixels"]), bool(request["allow_animated"])) if fds
                  else {"kind": "not_an_image", "detail": "no file was sent"})  # fmt: skip
        channel.sendall(json.dumps(answer).encode() + b"\n")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
