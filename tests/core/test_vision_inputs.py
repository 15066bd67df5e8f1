"""Model-side image preparation: qwen-vl-utils' smart-resize rules, per-item bounds, clear errors."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import pytest
from PIL import Image

from thyme.backends.vision_inputs import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_PIXELS,
    iter_image_items,
    open_image,
    prepare_image,
    smart_resize,
)
from thyme.errors import ImageError


@pytest.mark.parametrize("factor", [28, 32])
def test_smart_resize_matches_transformers(factor: int) -> None:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as reference

    for height in (20, 28, 57, 300, 480, 1079, 2160, 5000):
        for width in (28, 64, 500, 640, 1920, 4000):
            for low, high in ((DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS), (28 * 28, 256 * 256)):
                expected = reference(height, width, factor=factor, min_pixels=low, max_pixels=high)
                assert smart_resize(height, width, factor=factor, min_pixels=low, max_pixels=high) == expected


def test_smart_resize_known_values() -> None:
    # The values qwen-vl-utils gives (env-findings.md section 1): 256 -> 252, 500x300 -> 504x308.
    assert smart_resize(256, 256) == (252, 252)
    assert smart_resize(300, 500) == (308, 504)
    assert smart_resize(4000, 6000) == (2912, 4368)  # capped at 12.8 MP (2912 * 4368 = 12.7 M), aspect ratio kept


def test_smart_resize_refuses_extreme_aspect_ratio() -> None:
    with pytest.raises(ImageError, match="image of 10000x20 px has an aspect ratio above 200"):
        smart_resize(20, 10000)


def test_prepare_image_uses_item_bounds_and_leaves_input_alone(tmp_path: Path) -> None:
    path = tmp_path / "in.png"
    Image.new("RGB", (500, 300), (10, 20, 30)).save(path)
    before = path.read_bytes()
    assert prepare_image({"image": str(path)}).size == (504, 308)
    assert prepare_image({"image": str(path), "max_pixels": 28 * 28 * 4}).size == (56, 28)
    assert prepare_image({"image": f"file://{path}"}, min_pixels=1000 * 1000).size == (1316, 784)
    assert path.read_bytes() == before


def test_open_image_accepts_data_urls_and_flattens_transparency() -> None:
    buffer = io.BytesIO()
    Image.new("RGBA", (4, 4), (255, 0, 0, 0)).save(buffer, format="PNG")
    data_url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    image = open_image(data_url)
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (255, 255, 255)


def test_open_image_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match=f"image not found: {tmp_path}/missing.png"):
        open_image(str(tmp_path / "missing.png"))
    text_file = tmp_path / "notes.jpg"
    text_file.write_text("not an image")
    with pytest.raises(ImageError, match=f"cannot read image {text_file}"):
        open_image(str(text_file))


def test_iter_image_items_follows_chat_order() -> None:
    messages = [
        {"role": "system", "content": "plain text"},
        {"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "q"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "t"}, {"image": "b.png"}]},
    ]
    assert [item["image"] for item in iter_image_items(messages)] == ["a.png", "b.png"]
