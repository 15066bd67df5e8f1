"""Images of a chat as the MODEL sees them: found in the messages, opened, resized by qwen-vl-utils' rules.

The sandbox and the prompt always use the original file and size (the model writes crop boxes in original pixels,
thyme-reference.md section 1.7); only the copy handed to the model is resized. Both backends resize here, so a
local model and a vLLM server get the same pixels.

``smart_resize`` is written out (15 lines) rather than imported: qwen_vl_utils imports torchvision at module top
(unusable on CPU installs, env-findings.md section 1) and transformers' copy lives in a transformers module, which
the ``openai`` extra does not install. ``tests/core/test_vision_inputs.py`` checks it against transformers' copy.
This module imports only Pillow, so the OpenAI backend stays free of torch.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlparse

from PIL import Image, UnidentifiedImageError

from thyme.errors import ImageError

# qwen-vl-utils' defaults, used by the original eval for every image, sandbox outputs included (reference 1.7).
DEFAULT_MIN_PIXELS = 3136  # 4 * 28 * 28
DEFAULT_MAX_PIXELS = 12_845_056  # 16384 * 28 * 28
# Qwen2-VL / Qwen2.5-VL: 14-px patches merged 2x2; Qwen3-VL uses 16-px patches (factor 32).
QWEN2_VL_IMAGE_FACTOR = 28
# qwen-vl-utils refuses images whose long side exceeds 200 times the short side.
MAX_ASPECT_RATIO = 200

_DATA_URL_PREFIX = "data:"
_FILE_URL_PREFIX = "file://"


def smart_resize(
    height: int,
    width: int,
    *,
    factor: int = QWEN2_VL_IMAGE_FACTOR,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[int, int]:
    """Returns the (height, width) the model sees: multiples of ``factor``, area within the bounds, aspect kept.

    Raises:
        ImageError: The aspect ratio exceeds 200 (the Qwen-VL processors refuse such images).

    Example:
        >>> smart_resize(300, 500)
        (308, 504)
    """
    if max(height, width) / max(1, min(height, width)) > MAX_ASPECT_RATIO:
        raise ImageError(
            f"image of {width}x{height} px has an aspect ratio above {MAX_ASPECT_RATIO}: crop or pad it first"
        )
    resized_height = max(factor, round(height / factor) * factor)
    resized_width = max(factor, round(width / factor) * factor)
    if resized_height * resized_width > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        resized_height = max(factor, math.floor(height / beta / factor) * factor)
        resized_width = max(factor, math.floor(width / beta / factor) * factor)
    elif resized_height * resized_width < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        resized_height = math.ceil(height * beta / factor) * factor
        resized_width = math.ceil(width * beta / factor) * factor
    return resized_height, resized_width


def iter_image_items(messages: list[dict]) -> Iterator[dict]:
    """Yields the image content items of ``messages`` in chat order (the order of the template's image slots)."""
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            for item in content:
                if item.get("type") == "image" or "image" in item:
                    yield item


def image_format(source: str | Path | Image.Image) -> str | None:
    """The stored format (``"JPEG"``, ``"PNG"``...) of an image source, read from its header; None if unknown."""
    if isinstance(source, Image.Image):
        return source.format
    try:
        with _open_lazily(str(source)) as image:
            return image.format
    except (OSError, ValueError):  # unreadable here: open_image reports it when the pixels are needed
        return None


def open_image(source: str | Path | Image.Image) -> Image.Image:
    """Opens a path, ``file://`` URL, ``data:`` URL or PIL image as an RGB image (transparency on white, as
    qwen-vl-utils does).

    Raises:
        ImageError: The file is missing or is not an image.
    """
    if isinstance(source, Image.Image):
        image = source
    else:
        text = str(source)
        try:
            image = _open_lazily(text)
            image.load()
        except FileNotFoundError as exc:
            raise ImageError(f"image not found: {text}: check the path the message names") from exc
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise ImageError(f"cannot read image {text[:200]}: {exc}") from exc
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.split()[3])
        return background
    return image.convert("RGB")


def _open_lazily(text: str) -> Image.Image:
    """``Image.open`` (header only) of a path, ``file://`` URL or base64 ``data:`` URL."""
    if text.startswith(_DATA_URL_PREFIX):
        return Image.open(io.BytesIO(base64.b64decode(text.split(",", 1)[1])))
    return Image.open(unquote(urlparse(text).path) if text.startswith(_FILE_URL_PREFIX) else text)


def prepare_image(
    item: dict,
    *,
    factor: int = QWEN2_VL_IMAGE_FACTOR,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """Opens an image content item and resizes it for the model.

    The item's own ``min_pixels`` / ``max_pixels`` keys override the defaults (qwen-vl-utils convention). The
    caller's image is never modified: a resized copy is returned (or the RGB copy when no resize is needed).
    """
    image = open_image(item["image"])
    height, width = smart_resize(
        image.height,
        image.width,
        factor=factor,
        min_pixels=int(item.get("min_pixels", min_pixels)),
        max_pixels=int(item.get("max_pixels", max_pixels)),
    )
    if (height, width) == (image.height, image.width):
        return image
    return image.resize((width, height), resample=Image.Resampling.BICUBIC)


__all__ = [
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MIN_PIXELS",
    "MAX_ASPECT_RATIO",
    "QWEN2_VL_IMAGE_FACTOR",
    "image_format",
    "iter_image_items",
    "open_image",
    "prepare_image",
    "smart_resize",
]
