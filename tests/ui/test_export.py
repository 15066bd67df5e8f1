"""The conversation zip: trajectories with paths rewritten to the images packed beside them."""

from __future__ import annotations

import zipfile

import pytest
from PIL import Image

from thyme.trajectory import ModelText, SandboxOutput, Trajectory
from thyme.ui.export import write_conversation_zip


def _image(path, color) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), color).save(path)
    return str(path)


def test_zip_rewrites_paths_dedups_inputs_and_keeps_same_named_crops_apart(tmp_path):
    source = _image(tmp_path / "upload" / "car.png", "blue")
    crop_1 = _image(tmp_path / "turn_1" / "crop.png", "red")
    crop_2 = _image(tmp_path / "turn_2" / "crop.png", "green")
    first = Trajectory("s", "u", [source], [ModelText("a"), SandboxOutput(images=[crop_1]), ModelText("b")])
    second = Trajectory("s", "u", [source], [ModelText("c"), SandboxOutput(images=[crop_2])])
    archive = write_conversation_zip([first, second], tmp_path / "out.zip")

    with zipfile.ZipFile(archive) as zf:
        assert sorted(zf.namelist()) == [
            "input/car.png", "sandbox/crop.png", "sandbox/crop_2.png", "trajectory_1.json", "trajectory_2.json",
        ]  # fmt: skip
        zf.extractall(tmp_path / "unpacked")
    loaded = [Trajectory.load(tmp_path / "unpacked" / f"trajectory_{i}.json") for i in (1, 2)]
    assert [t.image_paths for t in loaded] == [["input/car.png"], ["input/car.png"]]
    assert [t.sandbox_images for t in loaded] == [["sandbox/crop.png"], ["sandbox/crop_2.png"]]
    assert Image.open(tmp_path / "unpacked" / "sandbox/crop_2.png").getpixel((0, 0)) == (0, 128, 0)
    assert first.image_paths == [source] and first.sandbox_images == [crop_1]  # the trajectory itself is unchanged


def test_zip_missing_image_raises(tmp_path):
    trajectory = Trajectory("s", "u", [str(tmp_path / "gone.png")], [ModelText("a")])
    with pytest.raises(FileNotFoundError):
        write_conversation_zip([trajectory], tmp_path / "out.zip")
