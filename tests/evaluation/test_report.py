"""report.md: which trajectories it shows and how (code, crops as relative links, text outputs, errors)."""

from __future__ import annotations

from pathlib import Path

from thyme.evaluation.metrics import compute_metrics
from thyme.evaluation.predictions import Prediction
from thyme.evaluation.report import pick_examples, write_report
from thyme.trajectory import ModelText, SandboxOutput, Trajectory


def _row(index: str, correct: bool, code_blocks: int = 0, trajectory: dict | None = None) -> Prediction:
    said = "maple" if correct else "oak"
    return Prediction(
        index, "thyme", "vqa", "text", None, "Word?", "maple", said, said, correct, code_blocks=code_blocks,
        trajectory=trajectory,
    )  # fmt: skip


def test_pick_examples_prefers_code_users_right_then_wrong() -> None:
    rows = [_row("1", True), _row("2", False, 1), _row("3", True, 2), _row("4", False)]
    assert [p.index for p in pick_examples(rows, 3)] == ["3", "2", "1"]
    assert [p.index for p in pick_examples(rows, 0)] == []


def test_report_renders_code_crops_and_text_outputs(tmp_path: Path) -> None:
    crop = tmp_path / "crops" / "7" / "a1_c0_0_crop.png"
    crop.parent.mkdir(parents=True)
    crop.write_bytes(b"png")
    code = "<code>\n```python\nprint(processed_path)\n```\n</code>"
    segments = [
        ModelText(f"<think>Zoom. {code}"),
        SandboxOutput(images=[str(crop)]),
        ModelText("Count them. <code>\n```python\nprint(3 + 4)\n```\n</code>"),
        SandboxOutput(text="7"),
        ModelText("Done.</think>\n<answer>maple</answer>"),
    ]
    trajectory = Trajectory("system", "user", ["/in.jpg"], segments).to_dict()
    rows = [_row("7", True, code_blocks=2, trajectory=trajectory)]
    path = write_report(tmp_path, rows, compute_metrics(rows), {"dataset": "d.jsonl", "model": "m", "mode": "thyme"})
    report = path.read_text(encoding="utf-8")
    assert report.startswith("# Thyme evaluation: d.jsonl\n")
    assert "### Row 7 (text, right)" in report
    assert "```python\nprint(processed_path)\n```" in report
    assert "![crop](crops/7/a1_c0_0_crop.png)" in report  # relative: the folder can be moved
    assert "Sandbox output:\n```text\n7\n```" in report
    assert "**Answer:** maple" in report
    assert "| text | 1 | 1 | 100.0 |" in report
