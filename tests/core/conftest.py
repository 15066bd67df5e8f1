"""Fixtures of the core tests: one real sandbox for the whole run (its warm workers are the slow part)."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image


@pytest.fixture(scope="session")
def sandbox():
    from thyme.sandbox import Sandbox

    with Sandbox(timeout=20) as box:  # generous: several test processes share two cores
        yield box


@pytest.fixture
def small_image(tmp_path) -> Path:
    path = tmp_path / "item7.png"
    Image.new("RGB", (96, 64), (30, 60, 200)).save(path)
    return path
