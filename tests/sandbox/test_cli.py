"""``thyme sandbox run``: flags mapped onto the library, results printed, errors as one line."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np

from thyme.cli import main


def test_sandbox_run_json_prints_result_and_copies_images(example: dict, tmp_path: Path, capsys) -> None:
    code_path = tmp_path / "code.py"
    code_path.write_text(example["code"])
    out_dir = tmp_path / "out"
    rc = main(["sandbox", "run", str(code_path), "--image", str(example["image"]), "--json", "--output-dir",
               str(out_dir), "--timeout-s", "30"])
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    assert result["ok"] is True and result["error"] is None
    assert len(result["images"]) == 1 and Path(result["images"][0]).parent == out_dir
    assert np.array_equal(cv2.imread(result["images"][0]), cv2.imread(str(example["crop"])))


def test_sandbox_run_failing_code_exits_2_with_the_error_line(small_image: Path, tmp_path: Path, capsys) -> None:
    code_path = tmp_path / "bad.py"
    code_path.write_text("print('partial')\nimport socket")
    rc = main(["sandbox", "run", str(code_path), "--image", str(small_image), "--item-id", "9"])
    captured = capsys.readouterr()
    assert rc == 2
    assert captured.out == "partial\n"
    assert captured.err.startswith("Sandbox for 9: Code execution failed due to ImportError.")


def test_sandbox_run_missing_files_exit_1_with_one_line(small_image: Path, tmp_path: Path, capsys) -> None:
    assert main(["sandbox", "run", str(tmp_path / "none.py"), "--image", str(small_image)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("thyme: error: cannot read the code file") and err.count("\n") == 1
    code_path = tmp_path / "ok.py"
    code_path.write_text("print(1)")
    assert main(["sandbox", "run", str(code_path), "--image", str(tmp_path / "none.jpg")]) == 1
    assert "does not exist or is not a file" in capsys.readouterr().err


def test_sandbox_run_names_images_saved_without_printing_their_path(small_image: Path, tmp_path: Path, capsys) -> None:
    """A crop whose path the code never prints is invisible to the model: the CLI says so, --output-dir keeps it."""
    code_path = tmp_path / "crop.py"
    code_path.write_text(
        "import cv2\nimg = cv2.imread(image_path)\n"
        "cv2.imwrite('/mnt/data/temp_processed_images/shown.png', img[:32, :32])\n"
        "cv2.imwrite('/mnt/data/temp_processed_images/silent.png', img[:40, :40])\n"
        "print('/mnt/data/temp_processed_images/shown.png')\n"
    )
    out_dir = tmp_path / "kept"
    rc = main(["sandbox", "run", str(code_path), "--image", str(small_image), "--output-dir", str(out_dir)])
    captured = capsys.readouterr()
    assert rc == 0
    assert f"image: {out_dir / 'shown.png'}" in captured.out and "silent" not in captured.out
    assert "saved 1 image(s) without printing the path (silent.png): kept in --output-dir" in captured.err
    assert sorted(p.name for p in out_dir.iterdir()) == ["shown.png", "silent.png"]

    rc = main(["sandbox", "run", str(code_path), "--image", str(small_image), "--json"])
    result = json.loads(capsys.readouterr().out)
    assert [Path(p).name for p in result["images"]] == ["shown.png"]
    assert [Path(p).name for p in result["unprinted_images"]] == ["silent.png"]
