"""Metrics over predictions and the resumable predictions file."""

from __future__ import annotations

import json
from pathlib import Path

from thyme.evaluation.metrics import compute_metrics
from thyme.evaluation.predictions import Prediction, PredictionsFile


def _prediction(index: str, correct: bool, category: str | None = "FSP", **kwargs) -> Prediction:
    return Prediction(index, "thyme", "mcq", category, None, "q", "A", "A" if correct else "B",
                      "A" if correct else "B", correct, **kwargs)  # fmt: skip


def test_compute_metrics_accuracy_and_tool_use() -> None:
    rows = [
        _prediction("1", True, generation_calls=2, code_blocks=1, generated_tokens=30, prompt_tokens=100),
        _prediction("2", True, generation_calls=3, code_blocks=2, sandbox_errors=1, generated_tokens=50),
        _prediction("3", False, category="FCP", generation_calls=1, generated_tokens=10),
        _prediction("4", False, category="FCP", generation_calls=1, generated_tokens=10),
    ]
    m = compute_metrics(rows)
    assert (m.total, m.correct, m.accuracy) == (4, 2, 0.5)
    assert {k: v.accuracy for k, v in m.categories.items()} == {"FCP": 0.0, "FSP": 1.0}
    assert m.macro_accuracy == 0.5
    assert m.code_use_rate == 0.5
    assert m.avg_generation_calls == 7 / 4
    assert (m.sandbox_runs, m.sandbox_error_rate) == (3, 1 / 3)
    assert m.avg_generated_tokens == 25.0
    assert m.to_dict()["categories"]["FSP"] == {"correct": 2, "total": 2, "accuracy": 1.0}


def test_compute_metrics_counts_unmatched_and_failed_rows() -> None:
    unmatched = Prediction("1", "thyme", "mcq", None, None, "q", "A", "no idea", None, False)
    failed = Prediction("2", "thyme", "mcq", None, None, "q", "A", None, None, False, error="bad image")
    m = compute_metrics([unmatched, failed])
    assert (m.unmatched, m.failed, m.macro_accuracy) == (1, 1, None)
    assert compute_metrics([]).accuracy == 0.0


def test_predictions_file_survives_a_half_written_line(tmp_path: Path) -> None:
    store = PredictionsFile(tmp_path / "predictions.jsonl")
    store.append(_prediction("1", True))
    with store.path.open("a", encoding="utf-8") as handle:
        handle.write('{"index": "2", "mo')  # a crash mid-write
    store.append(_prediction("3", False))
    done = store.load()
    assert sorted(done) == ["1", "3"]
    assert done["3"].correct is False
    lines = store.path.read_text(encoding="utf-8").splitlines()
    assert json.loads(lines[-1])["index"] == "3"
