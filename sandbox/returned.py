"""The images a run hands back: found in what it printed, taken out of the scratch dir without trusting it.

The scratch dir belongs to the worker, and code that escaped the language policy controls everything in it: it can
name a symbolic link ``crop.png`` pointing at a root-only file, hard-link one, put a FIFO there, or swap a checked
file for a link between the parent's check and its read. So the parent:

1. resolves printed paths *lexically* (no ``realpath``, which follows links; NUL bytes, unencodable characters,
   over-long names and ``..`` escapes simply do not match);
2. opens the scratch dir and then each component with ``O_NOFOLLOW`` relative to the previous directory's
   descriptor, refuses anything but a regular file with one link, and bounds the bytes it reads;
3. copies the bytes into the session's results dir, which the worker cannot reach (outside the sandbox's work
   dir, owned by the parent), so a later swap in the scratch dir changes nothing it handed out;
4. reads the copy's header in a bounded child (:mod:`.image_check`): a parse bomb costs at most a few seconds
   of a child, never the caller's memory.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from thyme.sandbox.image_check import ImageCheckFailed, check_image, describe
from thyme.sandbox.repair import OUTPUT_ALIAS

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "bmp", "gif", "tiff", "tif", "webp")
_PRINTED_PATH = re.compile(
    r"""[^\s'"`,;()\[\]{}<>=]+\.(?:""" + "|".join(IMAGE_EXTENSIONS) + r""")(?!\w)(?!\.\w)""", re.IGNORECASE
)
MAX_PATH_BYTES = 4096
"""PATH_MAX on Linux: a longer printed token cannot name a file."""
MAX_NAME_BYTES = 255
MAX_IMAGES_PER_RUN = 100
"""Distinct images one code block may return; more is refused with an error line (the model's context would not
hold them anyway)."""
_COPY_CHUNK = 1 << 20
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0)


class _Refused(Exception):
    """A printed file exists but may not be handed out; the message is the error line's text."""


@dataclass
class _Run:
    """What one collection holds while it works: the results so far and the bytes copied."""

    scratch_fd: int
    target_dir: Path
    max_file_bytes: int
    max_total_bytes: int
    max_pixels: int
    copied_bytes: int = 0
    seen: dict[tuple[int, int], str] = field(default_factory=dict)  # (st_dev, st_ino) -> the copy's path
    names: set[str] = field(default_factory=set)


def collect_images(stdout: str, processed_path: str | None, processed_is_str: bool, scratch_dir: str | Path,
                   target_dir: Path, *, max_pixels: int, max_file_bytes: int,
                   max_total_bytes: int) -> tuple[list[str], str | None]:  # fmt: skip
    """Finds the images a code block saved, copies them out of the scratch dir and checks their headers.

    Every printed token that looks like an image path (``IMAGE_EXTENSIONS``), in print order, counts if it names a
    file inside the scratch dir (directly, relative to it, or through ``/mnt/data/temp_processed_images/``); else
    ``processed_path``, if this block set it.

    Args:
        stdout (`str`): what the block printed.
        processed_path (`str` or `None`): the ``processed_path`` variable if this block set it.
        processed_is_str (`bool`): whether that variable was a string at all.
        scratch_dir (`str` or `Path`): the worker's scratch dir (nothing outside it is accepted).
        target_dir (`Path`): a new, empty directory only the parent can write: the copies go there.
        max_pixels (`int`): largest width x height returned.
        max_file_bytes (`int`): largest single file copied.
        max_total_bytes (`int`): bytes copied by this call at most.

    Returns:
        `tuple[list[str], str | None]`: the copies' paths in print order, and an error message (without the
        ``Sandbox for`` prefix) when the block pointed at an image that is missing, not a plain file, or not an
        image within the limits. With an error, the list is empty.
    """
    scratch = os.path.abspath(os.fspath(scratch_dir))
    try:
        scratch_fd = os.open(scratch, _OPEN_FLAGS | os.O_DIRECTORY)
    except OSError as exc:
        return [], f"The scratch dir could not be opened ({os.strerror(exc.errno or 0)}): no image can be returned."
    run = _Run(scratch_fd, target_dir, max_file_bytes, max_total_bytes, max_pixels)
    try:
        return _collect(run, stdout, processed_path, processed_is_str, scratch)
    except _Refused as refused:
        for path in run.seen.values():
            os.unlink(path)
        return [], str(refused)
    finally:
        os.close(scratch_fd)


def _collect(run: _Run, stdout: str, processed_path: str | None, processed_is_str: bool,
             scratch: str) -> tuple[list[str], str | None]:  # fmt: skip
    images: list[str] = []
    missing: str | None = None
    for match in _PRINTED_PATH.finditer(stdout):
        printed = match.group(0)
        relative = scratch_relative(printed, scratch)
        if relative is None:
            continue
        copy = _take(run, relative)
        if copy is None:
            if missing is None and os.path.isabs(printed):
                missing = printed  # a bare name in a sentence ("the input is 17127.jpg") is not a claim of a result
        elif copy not in images:
            images.append(copy)
    if not images and processed_path is not None:
        relative = scratch_relative(processed_path, scratch) if processed_is_str else None
        if relative is None:
            where = f"which is not a valid file path in {scratch}."
            return [], f"'processed_path' variable set to {_shown(processed_path)}, {where}"
        copy = _take(run, relative)
        if copy is None:
            return [], f"'processed_path' variable set to {_shown(processed_path)}, but file does not exist."
        images.append(copy)
    if not images and missing is not None:
        return [], f"Path '{_shown(missing, quote=False)}' found in print, but file does not exist or is not a file."
    return images, None


def scratch_relative(printed: str, scratch: str) -> str | None:
    """The path below ``scratch`` that a printed token names, worked out without touching the disk.

    ``..`` is resolved lexically; since no component may be a link (see ``_take``), that is what the kernel would
    do too. Returns ``None`` for anything that cannot name a file in the scratch dir: outside it, NUL bytes,
    characters the file system cannot encode (lone surrogates), or names longer than the OS allows.
    """
    if "\x00" in printed or len(printed) > MAX_PATH_BYTES:
        return None
    alias = OUTPUT_ALIAS.rstrip("/")
    if printed == alias or printed.startswith(OUTPUT_ALIAS):
        printed = scratch + printed[len(alias) :]
    joined = os.path.normpath(os.path.join(scratch, printed))
    if not joined.startswith(scratch + os.sep):
        return None
    relative = joined[len(scratch) + 1 :]
    try:
        encoded = os.fsencode(relative)
    except UnicodeEncodeError:
        return None
    if len(encoded) > MAX_PATH_BYTES or any(len(part) > MAX_NAME_BYTES for part in encoded.split(b"/")):
        return None
    return relative


def _take(run: _Run, relative: str) -> str | None:
    """Copies one file out of the scratch dir; ``None`` when it does not exist, ``_Refused`` when it may not go."""
    name = os.path.basename(relative)
    parts = relative.split(os.sep)
    dir_fd = run.scratch_fd
    opened: list[int] = []
    try:
        for part in parts[:-1]:
            try:
                dir_fd = os.open(part, _OPEN_FLAGS | os.O_DIRECTORY, dir_fd=dir_fd)
            except OSError as exc:
                if exc.errno == errno.ENOENT or (exc.errno == errno.ENOTDIR and not _is_link(part, dir_fd)):
                    return None  # missing, or a plain file used as a directory
                raise _Refused(f"The saved file '{name}' is reached through '{part}', which is not a plain "
                               "directory: only files the code wrote come back as images.") from exc  # fmt: skip
            opened.append(dir_fd)
        try:
            info = os.stat(parts[-1], dir_fd=dir_fd, follow_symlinks=False)
        except OSError:
            return None
        _refuse_unless_plain(info, name)
        try:
            fd = os.open(parts[-1], _OPEN_FLAGS | os.O_NONBLOCK, dir_fd=dir_fd)
        except OSError as exc:
            raise _Refused(f"The saved file '{name}' could not be opened without following a link.") from exc
        try:
            opened_info = os.fstat(fd)
            _refuse_unless_plain(opened_info, name)
            if (opened_info.st_dev, opened_info.st_ino) != (info.st_dev, info.st_ino):
                raise _Refused(f"The saved file '{name}' changed while it was being read.")
            key = (opened_info.st_dev, opened_info.st_ino)
            if key in run.seen:
                return run.seen[key]
            if len(run.seen) >= MAX_IMAGES_PER_RUN:
                raise _Refused(f"The code printed more than {MAX_IMAGES_PER_RUN} saved images; return fewer per "
                               "code block.")  # fmt: skip
            copy = _copy(run, fd, name)
            run.seen[key] = copy
        finally:
            os.close(fd)
        return copy
    finally:
        for descriptor in opened:
            os.close(descriptor)


def _is_link(name: str, dir_fd: int) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _refuse_unless_plain(info: os.stat_result, name: str) -> None:
    if stat.S_ISLNK(info.st_mode):
        raise _Refused(f"The saved file '{name}' is a symbolic link: only files the code wrote come back as images.")
    if not stat.S_ISREG(info.st_mode):
        raise _Refused(
            f"The saved file '{name}' is not a regular file: only files the code wrote come back as images."
        )
    if info.st_nlink != 1:
        raise _Refused(f"The saved file '{name}' is a hard link to another file: only files the code wrote come "
                       "back as images.")  # fmt: skip


def _copy(run: _Run, source_fd: int, name: str) -> str:
    """Copies at most ``max_file_bytes`` from ``source_fd`` into the results dir and checks the copy's header."""
    target_name = name if name not in run.names else f"{len(run.names)}_{name}"
    run.names.add(target_name)
    target = run.target_dir / target_name
    out = os.open(target, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    try:
        limit = min(run.max_file_bytes, run.max_total_bytes - run.copied_bytes)
        size = _copy_bounded(source_fd, out, limit + 1)  # one byte more than allowed tells "too large"
        if size > run.max_file_bytes:
            raise _Refused(f"The saved file '{name}' is larger than {run.max_file_bytes} bytes.")
        if size > limit:
            raise _Refused(f"The saved images are larger than {run.max_total_bytes} bytes together.")
        run.copied_bytes += size
        try:
            check_image(out, run.max_pixels)
        except ImageCheckFailed as failure:
            raise _Refused(describe(failure, f"The saved {_noun(failure)} '{name}'", run.max_pixels)) from None
        except OSError as exc:
            raise _Refused(f"The saved file '{name}' could not be checked ({exc}).") from None
    except BaseException:
        os.close(out)
        os.unlink(target)
        raise
    os.close(out)
    return str(target)


def _copy_bounded(source_fd: int, out_fd: int, limit: int) -> int:
    """Copies at most ``limit`` bytes; returns how many. The kernel copies (``copy_file_range``: no trip through
    Python, 3-8x faster on a 6 MB PNG here) where it can, else 1 MiB reads."""
    copied = 0
    try:
        while copied < limit and (count := os.copy_file_range(source_fd, out_fd, min(limit - copied, 1 << 30))):
            copied += count
        return copied
    except (AttributeError, OSError):  # no copy_file_range (macOS), or not between these file systems
        if copied:
            raise
    while copied < limit and (chunk := os.read(source_fd, min(_COPY_CHUNK, limit - copied))):
        os.write(out_fd, chunk)
        copied += len(chunk)
    return copied


def _noun(failure: ImageCheckFailed) -> str:
    return "image" if failure.kind == "too_large" else "file"


def _shown(text: str, quote: bool = True, limit: int = 200) -> str:
    """A printed value made safe for an error line: bounded, no NUL, no lone surrogates."""
    cut = text if len(text) <= limit else text[:limit] + "..."
    cut = clean_text(cut.replace("\x00", "\\x00"))
    return repr(cut) if quote else cut


def open_returned_image(path: str | os.PathLike[str]) -> tuple[BinaryIO, int] | None:
    """Opens an image the sandbox handed out, for a server to send: never through a link, only a regular file.

    The copies live where the worker cannot write, so this is a second line: a server's image endpoint must not
    become a way to read any file should a path ever point elsewhere.

    Returns:
        `tuple[BinaryIO, int]` or `None`: the open file and its size, or ``None`` when the path is missing, a
        link, or not a regular file.
    """
    try:
        fd = os.open(path, _OPEN_FLAGS | os.O_NONBLOCK)
    except OSError:
        return None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        os.close(fd)
        return None
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb"), info.st_size


_SURROGATE = re.compile("[\ud800-\udfff]")


def clean_text(text: str) -> str:
    """Replaces lone surrogates (valid in a Python ``str``, not in UTF-8) with U+FFFD, so the text can be encoded
    as JSON/UTF-8 by the HTTP server and the UI."""
    return _SURROGATE.sub("\ufffd", text)
