"""The offline V*-style generator: deterministic, loadable, and its answers are in its pixels."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from PIL import Image

from thyme.evaluation.datasets import load_dataset
from thyme.evaluation.synth import CATEGORIES, COLORS, generate_synth


def _digest(folder: Path) -> str:
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file())).hexdigest()


def test_synth_is_deterministic_and_loads_as_a_benchmark(tmp_path: Path) -> None:
    first = generate_synth(tmp_path / "a", n=8, size=512, seed=3)
    generate_synth(tmp_path / "b", n=8, size=512, seed=3)
    generate_synth(tmp_path / "c", n=8, size=512, seed=4)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")
    items = load_dataset(first)
    assert [i.category for i in items] == [*CATEGORIES, *CATEGORIES]
    assert [i.question_type for i in items[:4]] == ["mcq", "mcq", "vqa", "vqa"]
    with Image.open(items[0].image_path) as image:
        assert image.size == (512, 384)


def test_synth_ground_truth_is_in_the_pixels(tmp_path: Path) -> None:
    items = load_dataset(generate_synth(tmp_path, n=8, size=1024, seed=0))
    for item in items:
        boxes = item.extra["bbox"]
        with Image.open(item.image_path) as image:
            rgb = image.convert("RGB")
        if item.category == "color":
            x0, y0, x1, y1 = boxes[0]
            centre = rgb.getpixel(((x0 + x1) // 2, (y0 + y1) // 2))
            expected = COLORS[item.options[item.answer]]
            assert max(abs(a - b) for a, b in zip(centre, expected, strict=True)) < 40, (item.index, centre)
        if item.category == "position":
            (a0, _, a1, _), (b0, _, b1, _) = boxes
            assert item.options[item.answer] == ("left" if a0 + a1 < b0 + b1 else "right")
        for x0, y0, x1, y1 in boxes:
            assert 0 <= x0 < x1 <= rgb.width and 0 <= y0 < y1 <= rgb.height
            assert (x1 - x0) * (y1 - y0) < 0.01 * rgb.width * rgb.height  # small targets, as in V*


def test_synth_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"size \(100\) must be at least 256"):
        generate_synth(tmp_path, n=1, size=100)
    with pytest.raises(ValueError, match=r"n \(0\) must be at least 1"):
        generate_synth(tmp_path, n=0)
