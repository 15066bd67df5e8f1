"""Shared sandbox fixtures: one warm Sandbox per test module, the README example's files."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from thyme.sandbox import Sandbox

REPO = Path(__file__).resolve().parents[2]
EXAMPLE_IMAGE = REPO / "thyme" / "data" / "examples" / "17127.jpg"
EXAMPLE_CROP = REPO / "tests" / "data" / "17127_ebd8fd46.jpg"
EXAMPLE_CODE = json.loads((REPO / "thyme" / "data" / "examples" / "readme_17127.json").read_text())["code"]


@pytest.fixture
def example() -> dict[str, object]:
    """The original README example: input image, the model's exact code, the original's saved crop."""
    return {"image": EXAMPLE_IMAGE, "code": EXAMPLE_CODE, "crop": EXAMPLE_CROP}


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    """One sandbox for the module: tests that need no isolation from each other share its warm workers."""
    with Sandbox(timeout=20, pool_size=1) as sb:
        yield sb


@pytest.fixture
def small_image(tmp_path: Path) -> Path:
    """A 200x120 RGB test image with a known pattern: red left half, blue right half."""
    import numpy as np
    from PIL import Image

    pixels = np.zeros((120, 200, 3), dtype=np.uint8)
    pixels[:, :100] = (255, 0, 0)
    pixels[:, 100:] = (0, 0, 255)
    path = tmp_path / "small.png"
    Image.fromarray(pixels).save(path)
    return path
