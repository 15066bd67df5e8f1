"""Input images of the tool server: uploads saved under a session folder, server-side paths checked against roots.

Only the image *header* is read here, in the bounded checker child of :mod:`..image_check` (a parse bomb costs
it a few seconds at most, never the server's memory), to refuse a file that is not an image or has too many pixels
with a clear answer before a session is opened; the pixels themselves are decoded only inside the sandbox worker.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from ..image_check import ImageCheckFailed, check_image, describe
from .errors import RequestRejected

_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
MAX_NAME_CHARS = 100


def check_image_header(path: Path, shown_name: str, max_pixels: int) -> tuple[int, int]:
    """Reads the size of an image from its header and refuses non-images and images over the pixel limit.

    Args:
        path (`Path`): the file to check.
        shown_name (`str`): the name to put in error messages (the upload's name, or the path the client gave).
        max_pixels (`int`): the largest width x height accepted.

    Returns:
        `tuple[int, int]`: width and height.

    Raises:
        RequestRejected: kind ``not_an_image`` (422) or ``image_too_large`` (413).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise RequestRejected(f"{shown_name!r} cannot be read on the server ({exc.strerror})") from exc
    try:
        header = check_image(fd, max_pixels, allow_animated=True)
    except ImageCheckFailed as failure:
        if failure.kind == "too_large":
            size = (f"is {failure.size[0]}x{failure.size[1]} = {failure.size[0] * failure.size[1]:,} pixels; "
                    if failure.size else "has more pixels than ")  # fmt: skip
            raise RequestRejected(
                f"image {shown_name!r} {size}the server accepts at most {max_pixels:,}: send a smaller image (resize "
                "it first) or start the server with a larger --max-pixels",
                kind="image_too_large", status=413,
            ) from None  # fmt: skip
        reason = failure.detail if failure.kind == "not_an_image" else describe(failure, "it", max_pixels)
        raise RequestRejected(
            f"{shown_name!r} is not an image PIL can read ({reason}): send a JPEG, PNG, WebP, BMP, GIF or TIFF file",
            kind="not_an_image", status=422,
        ) from None  # fmt: skip
    finally:
        os.close(fd)
    return header.width, header.height


def safe_file_name(name: str | None, index: int, taken: set[str]) -> str:
    """Turns a client's file name into one that is safe on disk and unique in the session.

    The name is kept where possible because the model is told the image's path, and the original prompts show it
    (``17127.jpg``).
    """
    stem = _UNSAFE_NAME_CHARS.sub("_", Path(name or "").name).strip("._")[-MAX_NAME_CHARS:]
    if not stem:
        stem = f"image{index}"
    candidate = stem
    while candidate in taken:
        candidate = f"{index}_{candidate}"
    taken.add(candidate)
    return candidate


def save_uploads(files: Sequence[tuple[str | None, BinaryIO]], upload_dir: Path, max_pixels: int) -> list[Path]:
    """Saves uploaded files under ``upload_dir`` and checks that each is an image within the pixel limit.

    Args:
        files (`Sequence[tuple[str | None, BinaryIO]]`): (client file name, readable stream) pairs.
        upload_dir (`Path`): an empty folder owned by the new session.
        max_pixels (`int`): the largest width x height accepted.

    Returns:
        `list[Path]`: the saved files, in the order given.

    Raises:
        RequestRejected: a file is not an image or is too large.
    """
    taken: set[str] = set()
    saved = []
    for index, (name, stream) in enumerate(files):
        target = upload_dir / safe_file_name(name, index, taken)
        with target.open("wb") as out:
            shutil.copyfileobj(stream, out)
        check_image_header(target, name or target.name, max_pixels)
        saved.append(target)
    return saved


def resolve_server_path(path: str, allowed_roots: Sequence[Path], max_pixels: int) -> Path:
    """Checks that a server-side image path lies under an allowed root, exists, and is an image within the limit.

    Symbolic links are resolved first, so a link inside a root cannot point outside it.

    Raises:
        RequestRejected: kind ``path_not_allowed`` (403), ``invalid_input`` (400) or an image error.
    """
    if not allowed_roots:
        raise RequestRejected(
            f"server-side path {path!r} refused: this server accepts uploads only. "
            "Upload the image, or start the server with --allow-root DIR",
            kind="path_not_allowed", status=403,
        )  # fmt: skip
    resolved = Path(path).resolve()
    if not any(resolved.is_relative_to(root) for root in allowed_roots):
        roots = ", ".join(str(root) for root in allowed_roots)
        raise RequestRejected(
            f"server-side path {path!r} is outside the allowed roots ({roots}): upload the image instead",
            kind="path_not_allowed", status=403,
        )  # fmt: skip
    if not resolved.is_file():
        raise RequestRejected(f"server-side path {path!r} is not an existing file on the server")
    check_image_header(resolved, path, max_pixels)
    return resolved
