"""Input images: validation errors a user can act on, original sizes, user files never touched."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from thyme.errors import ImageError
from thyme.images import open_input_image, read_image_size


@pytest.fixture
def jpeg(tmp_path) -> Path:
    path = tmp_path / "in.jpg"
    Image.new("RGB", (64, 48), (200, 10, 10)).save(path)
    return path


def test_path_keeps_the_users_file_and_original_size(jpeg):
    before = (hashlib.sha256(jpeg.read_bytes()).hexdigest(), os.stat(jpeg).st_mode)
    image = open_input_image(jpeg)
    assert (image.path, image.width, image.height, image.temporary) == (str(jpeg.resolve()), 64, 48, False)
    image.cleanup()
    assert (hashlib.sha256(jpeg.read_bytes()).hexdigest(), os.stat(jpeg).st_mode) == before


def test_missing_file(tmp_path):
    with pytest.raises(ImageError, match=r"image not found: .*nope\.jpg \(check the path\)"):
        open_input_image(tmp_path / "nope.jpg")


def test_directory(tmp_path):
    with pytest.raises(ImageError, match="is not a file"):
        open_input_image(tmp_path)


def test_not_an_image(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("hello", encoding="utf-8")
    with pytest.raises(ImageError, match="is not an image PIL can read"):
        open_input_image(path)


def test_truncated_image(jpeg, tmp_path):
    broken = tmp_path / "broken.png"
    Image.new("RGB", (300, 300), (1, 2, 3)).save(broken)
    broken.write_bytes(broken.read_bytes()[:200])
    with pytest.raises(ImageError, match="corrupt or truncated"):
        read_image_size(broken)


def test_too_many_pixels(jpeg):
    with pytest.raises(ImageError, match=r"64x48 = 3072 pixels, more than the limit of 1000: downscale"):
        open_input_image(jpeg, max_pixels=1000)


def test_pil_image_goes_to_a_private_temp_png():
    source = Image.new("RGB", (10, 6), (0, 255, 0))
    image = open_input_image(source)
    try:
        assert image.temporary and (image.width, image.height) == (10, 6)
        with Image.open(image.path) as written:
            assert written.format == "PNG" and written.getpixel((3, 3)) == (0, 255, 0)
    finally:
        image.cleanup()
    assert not Path(image.path).exists()


@pytest.mark.parametrize("shape", [(5, 7), (5, 7, 1), (5, 7, 3), (5, 7, 4)])
def test_numpy_arrays(shape):
    array = np.full(shape, 9, dtype=np.uint8)
    image = open_input_image(array)
    try:
        assert (image.width, image.height) == (7, 5)
        with Image.open(image.path) as written:
            assert np.asarray(written).reshape(-1)[0] == 9
    finally:
        image.cleanup()


def test_numpy_bad_dtype_and_shape():
    with pytest.raises(ImageError, match="dtype float64: convert it to uint8"):
        open_input_image(np.zeros((4, 4, 3)))
    with pytest.raises(ImageError, match=r"shape \(4, 4, 2\)"):
        open_input_image(np.zeros((4, 4, 2), dtype=np.uint8))


def test_unsupported_type():
    with pytest.raises(ImageError, match="unsupported image type bytes"):
        open_input_image(b"\x89PNG")


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims ``width x height`` (the pixel data is cut off): a huge image without the memory."""
    import struct
    import zlib

    Image.new("L", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = bytes(data[12:16]) + struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(ihdr))
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize(("width", "height"), [(12_000, 12_000), (20_000, 20_000)])
def test_huge_images_get_one_limit_and_one_message(tmp_path, width, height):
    """144 MP was called "corrupt or truncated", 400 MP got PIL's "decompression bomb DOS attack" and PIL's limit."""
    path = _png_header_only(tmp_path / "huge.png", width, height)
    with pytest.raises(ImageError) as info:
        read_image_size(path)
    message = str(info.value)
    assert f"{width}x{height} = {width * height} pixels, more than the limit of 100000000" in message
    assert "--max-input-pixels" in message
    assert "corrupt" not in message and "bomb" not in message.lower()
    assert Image.MAX_IMAGE_PIXELS is not None  # PIL's own limit is back for everyone else
