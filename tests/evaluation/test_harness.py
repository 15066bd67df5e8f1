"""The harness end to end: synthetic data, scripted model text (so the right score is known), real sandbox."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from thyme.backends.scripted import ScriptedBackend
from thyme.config import AgentConfig
from thyme.errors import ConfigError
from thyme.evaluation.datasets import EvalItem, load_dataset
from thyme.evaluation.harness import EvalConfig, format_question, run_evaluation
from thyme.evaluation.synth import generate_synth

N_ROWS = 8
CROP_MARGIN = 40  # the crop is 80x80 around the target's corner: above the sandbox's 64-px minimum crop


def _crop_code(item: EvalItem) -> str:
    x0, y0, _, _ = item.extra["bbox"][0]
    box = (max(0, x0 - CROP_MARGIN), max(0, y0 - CROP_MARGIN), x0 + CROP_MARGIN, y0 + CROP_MARGIN)
    return (
        "<code>\n```python\nfrom PIL import Image\nimage = Image.open(image_path)\n"
        f"crop = image.crop({box})\n"
        "processed_path = '/mnt/data/temp_processed_images/crop.png'\ncrop.save(processed_path)\n"
        "print(processed_path)\n```\n</code>"
    )


def _right_answer(item: EvalItem) -> str:
    if item.options:  # the released model's style: markdown, letter and text
        return f"**{item.answer}. {item.options[item.answer]}**"
    return item.answer.upper()


def _wrong_answer(item: EvalItem) -> str:
    if item.options:
        return next(letter for letter in item.options if letter != item.answer)
    return "something else"


def _scripts(items: list[EvalItem]) -> dict[str, list[str]]:
    """Rows 0-3 crop first (row 3's code fails), rows 0-5 answer right, 6-7 wrong: 6/8 right, 4 of 8 use code."""
    scripts = {}
    for number, item in enumerate(items):
        answer = _right_answer(item) if number < 6 else _wrong_answer(item)
        final = f"The crop settles it.</think>\n<answer> {answer} </answer>"
        if number == 3:
            scripts[item.index] = ["<think>Zoom in. <code>\n```python\nprint(1/0)\n```\n</code>", final]
        elif number < 3:
            scripts[item.index] = [f"<think>Zoom in. {_crop_code(item)}", final]
        else:
            scripts[item.index] = [f"<think>It is visible.</think>\n<answer>{answer}</answer>"]
    return scripts


@pytest.fixture(scope="module")
def synth_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_synth(tmp_path_factory.mktemp("synth"), n=N_ROWS, size=512, seed=7)


@pytest.fixture(scope="module")
def sandbox():
    from thyme.sandbox import Sandbox

    with Sandbox(timeout=20) as shared:
        yield shared


def _scripted(scripts: dict[str, list[str]], calls: list[str]):
    def backend_for(item: EvalItem) -> ScriptedBackend:
        calls.append(item.index)
        return ScriptedBackend(scripts[item.index])

    return backend_for


QUIET = {"progress": False}


def test_thyme_mode_scores_known_answers_and_keeps_crops(synth_set: Path, tmp_path: Path, sandbox) -> None:
    items = load_dataset(synth_set)
    calls: list[str] = []
    result = run_evaluation(
        synth_set, tmp_path, _scripted(_scripts(items), calls), EvalConfig(**QUIET), AgentConfig(), sandbox=sandbox
    )
    m = result.metrics
    assert (m.correct, m.total, m.accuracy) == (6, 8, 0.75)
    assert m.code_use_rate == 0.5
    assert (m.sandbox_runs, m.sandbox_error_rate) == (4, 0.25)
    assert m.avg_generation_calls == (4 * 2 + 4 * 1) / 8
    assert m.avg_generated_tokens is None  # the scripted backend reports no token ids: unknown, not 0
    assert m.categories["color"].total == 2 and m.categories["color"].correct == 2  # rows 0 and 4
    assert m.categories["digits"].correct == 1  # row 3 right, row 7 wrong

    first = result.predictions[0]
    assert first.prediction.startswith(items[0].answer + ". ") and first.extracted == items[0].answer
    # The crop came back from the real sandbox with the pixels of the requested box of the original image.
    (crop_path,) = first.images
    assert Path(crop_path).is_relative_to(tmp_path / "crops" / "0")
    x0, y0, _, _ = items[0].extra["bbox"][0]
    box = (max(0, x0 - CROP_MARGIN), max(0, y0 - CROP_MARGIN), x0 + CROP_MARGIN, y0 + CROP_MARGIN)
    with Image.open(items[0].image_path) as original, Image.open(crop_path) as crop:
        assert np.array_equal(np.asarray(crop.convert("RGB")), np.asarray(original.convert("RGB").crop(box)))
    assert (first.stop_reason, first.used_fallback, m.fallback_rate) == ("answer", False, 0.0)
    failing = result.predictions[3]
    assert failing.sandbox_errors == 1 and failing.correct
    error_text = [s for s in failing.trajectory["segments"] if s["type"] == "sandbox_output"][0]["error"]
    assert error_text.startswith("Sandbox for 3: ") and "division by zero" in error_text  # shown to the model

    results = json.loads((tmp_path / "results.json").read_text())
    assert results["metrics"]["accuracy"] == 0.75 and results["mode"] == "thyme"
    lines = (tmp_path / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == N_ROWS and json.loads(lines[0])["trajectory"]["segments"]
    report = (tmp_path / "report.md").read_text()
    assert "**Accuracy: 75.0 %** (6/8)" in report
    assert "Tokens per answer: n/a (backend reports no token ids) generated" in report
    assert f"![crop]({Path(crop_path).relative_to(tmp_path).as_posix()})" in report


def test_resume_skips_answered_rows_and_reruns_failed_ones(synth_set: Path, tmp_path: Path, sandbox) -> None:
    items = load_dataset(synth_set)
    scripts = _scripts(items)
    calls: list[str] = []
    first = run_evaluation(
        synth_set, tmp_path, _scripted(scripts, calls), EvalConfig(limit=3, **QUIET), sandbox=sandbox
    )
    assert (first.metrics.total, first.skipped, calls) == (3, 0, ["0", "1", "2"])
    calls.clear()
    second = run_evaluation(synth_set, tmp_path, _scripted(scripts, calls), EvalConfig(**QUIET), sandbox=sandbox)
    assert second.skipped == 3 and calls == ["3", "4", "5", "6", "7"]
    assert second.metrics.correct == 6
    assert len((tmp_path / "predictions.jsonl").read_text().splitlines()) == N_ROWS


def test_bad_row_is_recorded_and_runs_again(tmp_path: Path, sandbox) -> None:
    Image.new("RGB", (64, 64), (200, 10, 10)).save(tmp_path / "red.png")
    data = tmp_path / "set.jsonl"
    rows = [
        {"index": "ok", "image": "red.png", "question": "Color?", "answer": "red"},
        {"index": "gone", "image": "missing.png", "question": "Color?", "answer": "red"},
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    scripts = {"ok": ["<answer>Red</answer>"], "gone": ["<answer>red</answer>"]}
    calls: list[str] = []
    out = tmp_path / "out"
    result = run_evaluation(data, out, _scripted(scripts, calls), EvalConfig(**QUIET), sandbox=sandbox)
    assert (result.metrics.correct, result.metrics.failed) == (1, 1)
    bad = result.predictions[1]
    assert bad.error is not None and "row index 'gone': image file" in bad.error and "missing.png" in bad.error
    assert calls == ["ok"]  # the model was never asked about the row without an image
    (tmp_path / "missing.png").write_bytes((tmp_path / "red.png").read_bytes())
    calls.clear()
    again = run_evaluation(data, out, _scripted(scripts, calls), EvalConfig(**QUIET), sandbox=sandbox)
    assert calls == ["gone"] and (again.metrics.correct, again.metrics.failed) == (2, 0)


def test_direct_mode_asks_once_without_tools(synth_set: Path, tmp_path: Path) -> None:
    items = load_dataset(synth_set)
    backends: list[ScriptedBackend] = []

    def backend_for(item: EvalItem) -> ScriptedBackend:
        text = f"The answer is {_right_answer(item)}." if item.options else _right_answer(item)
        backends.append(ScriptedBackend([text if int(item.index) % 2 == 0 else _wrong_answer(item)]))
        return backends[-1]

    result = run_evaluation(synth_set, tmp_path, backend_for, EvalConfig(mode="direct", **QUIET))
    assert (result.metrics.correct, result.metrics.code_use_rate) == (4, 0.0)
    call = backends[0].calls[0]
    assert [m["role"] for m in call.messages] == ["user"] and call.stop == ()
    assert call.messages[0]["content"][1]["text"] == format_question(items[0])
    assert call.sampling.temperature == 0.0  # greedy by default
    with pytest.raises(ConfigError, match="direct-mode predictions; use a separate --out for each mode"):
        run_evaluation(synth_set, tmp_path, backend_for, EvalConfig(**QUIET))


def test_workers_run_rows_concurrently_with_the_same_scores(synth_set: Path, tmp_path: Path, sandbox) -> None:
    items = load_dataset(synth_set)
    calls: list[str] = []
    result = run_evaluation(
        synth_set, tmp_path, _scripted(_scripts(items), calls), EvalConfig(workers=3, **QUIET), sandbox=sandbox
    )
    assert sorted(calls) == [str(i) for i in range(N_ROWS)]
    assert [p.index for p in result.predictions] == [str(i) for i in range(N_ROWS)]  # dataset order
    assert (result.metrics.correct, result.metrics.sandbox_runs) == (6, 4)


def test_format_question_per_type() -> None:
    mcq = EvalItem(index="1", question="Color?", answer="B", options={"A": "red", "B": "blue"})
    assert format_question(mcq) == (
        "Question: Color?\nOptions:\nA. red\nB. blue\nPlease select the correct answer from the options above."
    )
    assert format_question(EvalItem(index="2", question="Word?", answer="maple")) == (
        "Word?\nPlease try to answer the question with short words or phrases if possible."
    )
