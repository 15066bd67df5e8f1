"""The README example of the original runs unchanged and gives the original's crop, pixel for pixel."""

from __future__ import annotations

import hashlib
from pathlib import Path

import cv2
import numpy as np

from thyme.sandbox import Sandbox


def test_readme_example_pixel_identical_to_original_crop(sandbox: Sandbox, example: dict) -> None:
    image, code, crop = example["image"], example["code"], example["crop"]
    before = hashlib.sha256(image.read_bytes()).hexdigest()
    with sandbox.session(image=str(image), item_id="17127") as session:
        result = session.run(code)
        assert result.ok, result.error
        assert len(result.images) == 1
        produced = cv2.imread(result.images[0])
        original = cv2.imread(str(crop))
        assert produced.shape == original.shape == (128, 220, 3)  # 110x40 grown to 110x64, zoomed 2x
        assert np.array_equal(produced, original)
        printed = Path(result.stdout.strip())  # the code printed its scratch path; the result is a checked copy
        assert printed.parent == session.scratch_dir and printed.read_bytes() == Path(result.images[0]).read_bytes()
        assert Path(result.images[0]) == session.results_dir / "run-1" / printed.name
        assert any("clamped to (1250, 1030, 1360, 1094)" in note for note in result.repairs)
    assert hashlib.sha256(image.read_bytes()).hexdigest() == before
