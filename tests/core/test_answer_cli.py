"""`thyme answer` called through main([...]) with the scripted backend."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

import thyme
from thyme.cli import main
from thyme.trajectory import Trajectory

EXAMPLES = Path(thyme.__file__).parent / "data" / "examples"
IMAGE = str(EXAMPLES / "17127.jpg")
SCRIPT = str(EXAMPLES / "readme_17127.json")


def test_streams_the_reasoning_then_the_answer(capsys):
    assert main(["answer", IMAGE, "What is the plate number?", "--scripted", SCRIPT]) == 0
    out = capsys.readouterr().out
    assert out.index("<think>To determine") < out.index("[sandbox image 220x128]") < out.index("Upon examining")
    assert out.rstrip().endswith("Answer: C. S QT 911")


def test_json_output(capsys):
    assert main(["answer", IMAGE, "Q?", "--scripted", SCRIPT, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["answer"] == "C. S QT 911" and summary["has_answer"] is True
    assert (summary["generation_calls"], summary["code_runs"], summary["code_errors"]) == (2, 1, 0)
    assert Trajectory.from_dict(summary["trajectory"]).answer == "C. S QT 911"


def test_save_dir_keeps_the_crop_and_the_trajectory(tmp_path, capsys):
    save = tmp_path / "run"
    assert main(["answer", IMAGE, "Q?", "--scripted", SCRIPT, "--save-dir", str(save)]) == 0
    assert "saved: " in capsys.readouterr().out
    trajectory = Trajectory.load(save / "trajectory.json")
    [crop] = trajectory.sandbox_images
    assert Path(crop).parent == save and Image.open(crop).size == (220, 128)


def test_no_answer_is_a_defined_outcome(tmp_path, capsys):
    script = tmp_path / "s.json"
    script.write_text(json.dumps(["I cannot tell."]), encoding="utf-8")
    assert main(["answer", IMAGE, "Q?", "--scripted", str(script), "--no-fallback", "--max-attempts", "1"]) == 0
    assert capsys.readouterr().out.rstrip().endswith("Answer: No answer tag found in the final output.")


def test_errors_are_one_line_and_exit_1(tmp_path, capsys):
    assert main(["answer", str(tmp_path / "nope.jpg"), "Q?", "--scripted", SCRIPT]) == 1
    assert (
        capsys.readouterr().err.strip() == f"thyme: error: image not found: {tmp_path / 'nope.jpg'} (check the path)"
    )
    assert main(["answer", IMAGE, "Q?", "--scripted", SCRIPT, "--max-generation-calls", "0"]) == 1
    assert "max_generation_calls (0) must be at least 1" in capsys.readouterr().err
    assert main(["answer", IMAGE, "Q?", "--model", str(tmp_path / "no-weights")]) == 1
    assert "download the weights first" in capsys.readouterr().err


def test_endpoint_flags_are_checked(capsys):
    assert main(["answer", IMAGE, "Q?", "--endpoint", "localhost:9"]) == 1
    assert "is not an http(s) URL" in capsys.readouterr().err
    assert main(["answer", IMAGE, "Q?", "--scripted", SCRIPT, "--model-name", "x"]) == 1
    assert "--model-name only applies with --endpoint" in capsys.readouterr().err
