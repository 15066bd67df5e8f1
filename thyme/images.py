"""Opening and validating the user's input image, and giving the sandbox a file for it.

The sandbox and the prompt need the ORIGINAL file and its ORIGINAL size (reference 1.7): the model writes crop boxes
in original pixels while the backend feeds it a resized copy. A path is used as is (never copied, chmod-ed or
rewritten); a PIL image or numpy array is written once to a private temporary PNG, because the sandbox runs in
another process and opens files, not objects.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from thyme.errors import ImageError

logger = logging.getLogger(__name__)

# Larger inputs are refused before decoding: 100 megapixels is about 300 MB of RGB, more than any benchmark image
# (HR-Bench 8K is ~56 MP) and below PIL's decompression-bomb error threshold (~179 MP).
DEFAULT_MAX_INPUT_PIXELS = 100_000_000
_PIL_LIMIT_LOCK = threading.Lock()

ImageSource = str | os.PathLike | Image.Image | Any  # Any: numpy.ndarray (numpy is imported only when one is given)


@dataclass
class InputImage:
    """An input image ready for the sandbox and the prompt.

    Args:
        path (`str`): absolute path of the file the sandbox opens (the user's own file, or our temporary copy).
        width (`int`): original width in pixels.
        height (`int`): original height in pixels.
        temporary (`bool`): True when ``path`` is a file Thyme wrote and :meth:`cleanup` removes.
    """

    path: str
    width: int
    height: int
    temporary: bool = False
    _temp_dir: str | None = field(default=None, repr=False)

    def cleanup(self) -> None:
        """Removes the temporary copy, if any (never the user's file)."""
        if self._temp_dir is not None:
            shutil.rmtree(self._temp_dir, ignore_errors=True)
            self._temp_dir = None


def _check_pixels(width: int, height: int, max_pixels: int, what: str) -> None:
    if width * height > max_pixels:
        raise ImageError(
            f"{what} is {width}x{height} = {width * height} pixels, more than the limit of {max_pixels}: "
            "downscale it first, or raise the limit (--max-input-pixels, AgentConfig.max_input_pixels)"
        )


@contextmanager
def _our_limit_only() -> Iterator[None]:
    """Lifts PIL's own decompression-bomb limit while a header is read, so that ``max_input_pixels`` is the one
    limit with the one message (PIL would refuse ~179 MP with its "DOS attack" wording, and warn from ~89 MP).

    PIL keeps its limit in a module global; it is lifted only around ``Image.open``, which reads the header alone
    (our own check follows at once, before any pixel is decoded), under a lock so concurrent reads restore it.
    """
    with _PIL_LIMIT_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def read_image_size(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_INPUT_PIXELS) -> tuple[int, int]:
    """Validates an image file by decoding it fully and returns its original ``(width, height)``.

    Raises:
        ImageError: the file is missing, not a file, not an image, corrupt or truncated, or too large.
    """
    path = Path(path)
    if not path.exists():
        raise ImageError(f"image not found: {path} (check the path)")
    if not path.is_file():
        raise ImageError(f"image path is not a file: {path}")
    try:
        with _our_limit_only():
            image = Image.open(path)
    except UnidentifiedImageError as exc:
        raise ImageError(f"{path} is not an image PIL can read (expected JPEG, PNG, WebP, BMP, TIFF, GIF)") from exc
    except (OSError, SyntaxError, ValueError) as exc:  # PIL reports a corrupt header with these
        raise ImageError(f"image {path} is corrupt or truncated: {exc}") from exc
    with image:
        width, height = image.size
        _check_pixels(width, height, max_pixels, f"image {path}")  # before decoding: an ImageError of its own
        try:
            image.load()  # decode everything: a truncated or corrupt body fails here, not in the sandbox
        except (OSError, SyntaxError, ValueError) as exc:  # PIL reports corrupt data with these
            raise ImageError(f"image {path} is corrupt or truncated: {exc}") from exc
    return width, height


def _to_pil(array: Any) -> Image.Image:
    import numpy as np

    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
        raise ImageError(f"numpy image has shape {array.shape}: expected (H, W), (H, W, 3) RGB or (H, W, 4) RGBA")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.dtype != np.uint8:
        raise ImageError(f"numpy image has dtype {array.dtype}: convert it to uint8 (0-255) first")
    return Image.fromarray(np.ascontiguousarray(array))  # uint8 (H, W) / (H, W, 3) / (H, W, 4) -> L / RGB / RGBA


def open_input_image(source: ImageSource, *, max_pixels: int = DEFAULT_MAX_INPUT_PIXELS) -> InputImage:
    """Turns a path, PIL image or numpy array (RGB channel order, uint8) into an :class:`InputImage`.

    Args:
        source (`str | os.PathLike | PIL.Image.Image | numpy.ndarray`): the image to ask about.
        max_pixels (`int`, defaults to `DEFAULT_MAX_INPUT_PIXELS`): refuse larger images.

    Raises:
        ImageError: the input cannot be used; the message says why and what to do.
    """
    if isinstance(source, (str, os.PathLike)):
        width, height = read_image_size(source, max_pixels)
        return InputImage(str(Path(source).resolve()), width, height)
    if isinstance(source, Image.Image):
        image = source
    elif type(source).__module__ == "numpy" and type(source).__name__ == "ndarray":
        image = _to_pil(source)
    else:
        raise ImageError(
            f"unsupported image type {type(source).__name__}: pass a file path, a PIL image or a numpy array"
        )
    _check_pixels(image.width, image.height, max_pixels, "the image")
    temp_dir = tempfile.mkdtemp(prefix="thyme-input-")
    path = os.path.join(temp_dir, "input.png")
    try:
        image.save(path, format="PNG")
    except (OSError, ValueError) as exc:
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise ImageError(
            f"cannot write the {image.mode} image as PNG for the sandbox: {exc}; convert it to RGB"
        ) from exc
    logger.debug("wrote in-memory image to %s", path)
    return InputImage(path, image.width, image.height, temporary=True, _temp_dir=temp_dir)


__all__ = ["DEFAULT_MAX_INPUT_PIXELS", "ImageSource", "InputImage", "open_input_image", "read_image_size"]
