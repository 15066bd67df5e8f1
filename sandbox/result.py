"""What one code block produced, and how saved images are found in what it printed.

The original accepted any printed path that existed, anywhere on disk (``/etc/hostname`` came back as an
"image"), and fell back to globbing the whole shared output dir in file-system order (reference 2.4). Here only
files inside the session's scratch dir are accepted, in the order they were printed; ``processed_path`` counts when
this block set it and nothing was printed.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from thyme.sandbox.repair import OUTPUT_ALIAS

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "bmp", "gif", "tiff", "tif", "webp")
_PRINTED_PATH = re.compile(
    r"""[^\s'"`,;()\[\]{}<>=]+\.(?:""" + "|".join(IMAGE_EXTENSIONS) + r""")(?!\w)(?!\.\w)""", re.IGNORECASE
)


@dataclass(frozen=True)
class ExecutionResult:
    """The outcome of one ``Session.run``.

    Args:
        ok (`bool`): the code ran to the end and its results were found; ``error`` is ``None``.
        stdout (`str`): what the code printed, capped (the cut is marked at the end).
        error (`str` or `None`): one line in the original's ``Sandbox for <id>: ...`` form, for the model to read.
        images (`list[str]`): absolute paths of the images the code saved, in print order, all inside the
            session's scratch dir.
        repairs (`list[str]`): the source repairs applied, one line each (empty when the code ran as written).
    """

    ok: bool
    stdout: str
    error: str | None = None
    images: list[str] = field(default_factory=list)
    repairs: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        """What goes back to the model when no image was saved: the error, else the stripped stdout."""
        return self.error if self.error is not None else self.stdout.strip()

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (CLI ``--json``, the HTTP server)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExecutionResult:
        return cls(ok=bool(data["ok"]), stdout=str(data["stdout"]), error=data.get("error"),
                   images=list(data.get("images", [])), repairs=list(data.get("repairs", [])))


def detect_images(stdout: str, processed_path: str | None, processed_is_str: bool,
                  scratch_dir: str) -> tuple[list[str], str | None]:
    """Finds the images a code block saved.

    Args:
        stdout (`str`): what the block printed.
        processed_path (`str` or `None`): the ``processed_path`` variable if this block set it.
        processed_is_str (`bool`): whether that variable was a string at all.
        scratch_dir (`str`): the session's scratch dir; nothing outside it is accepted.

    Returns:
        `tuple[list[str], str | None]`: the image paths in print order, and an error message (without the
        ``Sandbox for`` prefix) when the block pointed at an image that is not there.
    """
    scratch = os.path.realpath(scratch_dir)
    images: list[str] = []
    missing: str | None = None
    for match in _PRINTED_PATH.finditer(stdout):
        printed = match.group(0)
        real = _inside(printed, scratch)
        if real is None:
            continue
        if os.path.isfile(real):
            if real not in images:
                images.append(real)
        elif missing is None and os.path.isabs(printed):
            missing = printed  # a bare name in a sentence ("the input is 17127.jpg") is not a claim of a result
    if not images and processed_path is not None:
        real = _inside(processed_path, scratch) if processed_is_str else None
        if real is None:
            where = f"which is not a valid file path in {scratch}."
            return [], f"'processed_path' variable set to {processed_path!r}, {where}"
        if not os.path.isfile(real):
            return [], f"'processed_path' variable set to {processed_path!r}, but file does not exist."
        images.append(real)
    if not images and missing is not None:
        return [], f"Path '{missing}' found in print, but file does not exist or is not a file."
    return images, None


def check_saved_images(paths: list[str], max_pixels: int) -> str | None:
    """Reads the header of each image the code saved, here in the parent, before anyone decodes it.

    The facades refuse to save oversized images, but code can also write raw bytes (``open(p, "wb")``); a
    decompression bomb or a non-image named ``.png`` must not reach the model's image loader.

    Returns:
        `str` or `None`: what is wrong with the first bad file (without the ``Sandbox for`` prefix).
    """
    from PIL import Image, UnidentifiedImageError

    for path in paths:
        name = os.path.basename(path)
        try:
            with Image.open(path) as image:
                width, height = image.size
        except Image.DecompressionBombError:
            return f"The saved image '{name}' has more pixels than the limit of {max_pixels}."
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
            return f"The saved file '{name}' is not a readable image ({exc})."
        if width * height > max_pixels:
            return f"The saved image '{name}' is {width}x{height}, more pixels than the limit of {max_pixels}."
    return None


def _inside(printed: str, scratch: str) -> str | None:
    alias = OUTPUT_ALIAS.rstrip("/")
    if printed == alias or printed.startswith(OUTPUT_ALIAS):
        printed = scratch + printed[len(alias):]
    real = os.path.realpath(os.path.join(scratch, printed))
    return real if real.startswith(scratch + os.sep) else None
