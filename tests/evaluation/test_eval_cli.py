"""`thyme bench synth` and `thyme eval` through the real CLI entry point."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import thyme
from thyme.cli import main
from thyme.evaluation.datasets import load_dataset


def test_bench_synth_then_eval_scripted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "synth", "--out", str(tmp_path / "set"), "--n", "4", "--size", "512", "--seed", "1"]) == 0
    captured = capsys.readouterr()
    assert "wrote 4 rows to" in captured.out
    assert "thyme bench synth" in captured.err and "4/4" in captured.err  # the progress bar, on stderr
    data = tmp_path / "set" / "synth.jsonl"
    items = load_dataset(data)
    # Right answers for rows 0 and 1 (letters), wrong for 2 and 3.
    script = {item.index: [f"<answer>{item.answer if n < 2 else 'nope'}</answer>"] for n, item in enumerate(items)}
    (tmp_path / "script.json").write_text(json.dumps(script))
    argv = ["eval", "--data", str(data), "--scripted", str(tmp_path / "script.json"), "--out", str(tmp_path / "out")]
    assert main([*argv, "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "accuracy 50.0 % (2/4), mode thyme, 0 resumed" in out
    assert "  color: 100.0 % (1/1)" in out
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["backend"] == "scripted" and results["thyme_version"]
    assert results["agent_config"]["max_attempts"] == 1 and results["agent_config"]["sampling"] == "greedy"
    assert results["dataset"] == str(data.resolve())
    assert main([*argv, "--no-progress"]) == 0  # resumed: nothing left to run
    assert "4 resumed" in capsys.readouterr().out


def test_eval_replays_one_recording_for_every_row(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The README's dry run: the shipped two-question set, every row replaying the recorded README example."""
    examples = Path(thyme.__file__).parent / "data" / "examples"
    argv = ["eval", "--data", str(examples / "readme_eval.jsonl"), "--scripted", str(examples / "readme_17127.json"),
            "--out", str(tmp_path / "dry"), "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "every row replays the one recording" in captured.err
    assert "accuracy 50.0 % (1/2)" in captured.out  # the plate question right, the colour question not
    assert "  plate: 100.0 % (1/1)" in captured.out


def test_eval_flag_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"image": "x.jpg", "question": "q", "answer": "a"}) + "\n")
    assert main(["eval", "--data", str(data), "--model", str(tmp_path), "--workers", "2", "--out", str(tmp_path)]) == 1
    assert "--workers > 1 needs --endpoint" in capsys.readouterr().err
    assert main(["eval", "--data", str(data), "--scripted", str(tmp_path / "none.json"), "--out", str(tmp_path)]) == 1
    assert "cannot read script" in capsys.readouterr().err
    # A row whose image is missing is recorded as failed; the run finishes but exits 1: its results are incomplete.
    (tmp_path / "s.json").write_text(json.dumps({"other": ["<answer>a</answer>"], "0": ["<answer>a</answer>"]}))
    argv = ["eval", "--data", str(data), "--scripted", str(tmp_path / "s.json"), "--out", str(tmp_path / "o")]
    assert main([*argv, "--no-progress"]) == 1
    assert "1 row(s) failed (see 'error' in predictions.jsonl)" in capsys.readouterr().err
    Image.new("RGB", (32, 32)).save(tmp_path / "x.jpg")
    (tmp_path / "s.json").write_text(json.dumps({"other": ["<answer>a</answer>"]}))
    argv = ["eval", "--data", str(data), "--scripted", str(tmp_path / "s.json"), "--out", str(tmp_path / "o2")]
    assert main([*argv, "--no-progress"]) == 1
    assert "has no entry for row '0'; add one or use --limit" in capsys.readouterr().err
    assert main(["bench", "synth", "--out", str(tmp_path), "--n", "1", "--size", "64"]) == 1
    assert "size (64) must be at least 256" in capsys.readouterr().err


def test_bench_compare_prints_the_delta_per_category(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "synth", "--out", str(tmp_path / "set"), "--n", "4", "--size", "256"]) == 0
    data = tmp_path / "set" / "synth.jsonl"
    items = load_dataset(data)
    right = {item.index: [f"<answer>{item.answer}</answer>"] for item in items}
    half = {i.index: [f"<answer>{i.answer if n % 2 else 'x'}</answer>"] for n, i in enumerate(items)}
    for name, script in (("direct", half), ("thyme", right)):
        (tmp_path / f"{name}.json").write_text(json.dumps(script))
        argv = ["eval", "--data", str(data), "--scripted", str(tmp_path / f"{name}.json"), "--mode", name]
        assert main([*argv, "--out", str(tmp_path / name), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["bench", "compare", str(tmp_path / "direct"), str(tmp_path / "thyme")]) == 0
    table = capsys.readouterr().out
    assert "| accuracy (%) | direct (direct) | thyme (thyme) | Δ |" in table
    assert "| overall | 50.0 | 100.0 | +50.0 |" in table
    assert "| color | 0.0 | 100.0 | +100.0 |" in table and "| position | 100.0 | 100.0 | +0.0 |" in table
    assert "warning" not in table
    # A 2-row run against the 4-row one: the table still prints, under a warning.
    argv = ["eval", "--data", str(data), "--scripted", str(tmp_path / "direct.json"), "--limit", "2"]
    assert main([*argv, "--out", str(tmp_path / "two"), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["bench", "compare", str(tmp_path / "two"), str(tmp_path / "thyme")]) == 0
    table = capsys.readouterr().out
    assert table.startswith("> **warning**: the runs scored different numbers of rows (two: 2, thyme: 4)")
    assert "| overall |" in table
    assert main(["bench", "compare", str(tmp_path / "nothing"), str(tmp_path / "thyme")]) == 1
    assert "pass the --out folder of a finished `thyme eval` run" in capsys.readouterr().err


def test_eval_modules_import_without_torch() -> None:
    # `thyme eval --help` and `thyme bench synth` must not pay for torch; the harness loads it only via a backend.
    code = (
        "import sys, thyme.commands.eval, thyme.evaluation.harness, thyme.evaluation.synth, "
        "thyme.evaluation.adapters.vlmevalkit; print('torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert done.stdout.strip() == "False"
