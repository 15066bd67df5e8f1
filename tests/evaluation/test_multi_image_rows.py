"""Benchmark rows with several images (MMMU-style, some MME-RealWorld rows): read from TSV and JSONL, and every
image reaches the model and the sandbox in `thyme eval`."""

from __future__ import annotations

import base64
import csv
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from thyme.backends.scripted import ScriptedBackend
from thyme.config import AgentConfig
from thyme.evaluation.datasets import DatasetError, load_dataset, materialize_images
from thyme.evaluation.harness import EvalConfig, run_evaluation


def _png(color: str, size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def test_tsv_list_cells_and_jsonl_lists_give_every_image(tmp_path: Path) -> None:
    red, blue = (base64.b64encode(_png(c, (30, 20))).decode() for c in ("red", "blue"))
    tsv = tmp_path / "mmmu.tsv"
    with tsv.open("w", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t")
        writer.writerow(["index", "image", "question", "A", "B", "answer"])
        writer.writerow(["1", repr([red, blue]), "Which is blue?", "first", "second", "B"])  # VLMEvalKit's repr
        writer.writerow(["2", "1", "Same pair?", "yes", "no", "A"])  # a reference to row 1's images
    [first, second] = load_dataset(tsv)
    assert first.image_b64 == red and first.more_images == (blue,) and second.more_images == (blue,)
    paths = materialize_images(first, tmp_path / "cache")
    assert [Image.open(p).getpixel((0, 0)) for p in paths] == [(255, 0, 0), (0, 0, 255)]

    (tmp_path / "a.png").write_bytes(_png("red", (30, 20)))
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text(json.dumps({"image": ["a.png", blue], "question": "q", "answer": "x"}) + "\n")
    [item] = load_dataset(jsonl)
    assert item.image_path == tmp_path / "a.png" and item.more_images == (blue,)
    jsonl.write_text(json.dumps({"image": ["a.png", 3], "question": "q", "answer": "x"}) + "\n")
    with pytest.raises(DatasetError, match="'image' must be a path or base64 string, or a list of them"):
        load_dataset(jsonl)


@pytest.mark.parametrize("mode", ["thyme", "direct"])
def test_eval_gives_the_model_every_image_of_a_row(tmp_path: Path, mode: str) -> None:
    for name, color in (("a.png", "red"), ("b.png", "blue")):
        (tmp_path / name).write_bytes(_png(color, (30, 20)))
    data = tmp_path / "set.jsonl"
    data.write_text(json.dumps({"index": "0", "image": ["a.png", "b.png"], "question": "Colours?", "answer": "two"}))
    backends: list[ScriptedBackend] = []

    def backend_for(item):
        backends.append(ScriptedBackend(["<answer>two</answer>"]))
        return backends[-1]

    config = EvalConfig(mode=mode, progress=False)
    result = run_evaluation(data, tmp_path / "out", backend_for, config, AgentConfig(max_attempts=1))
    assert result.metrics.correct == 1 and result.predictions[0].error is None
    user = (
        backends[0].calls[0].messages[-1]["content"]
        if mode == "direct"
        else backends[0].calls[0].messages[1]["content"]
    )
    assert [item.get("image") for item in user[:2]] == [str(tmp_path / "a.png"), str(tmp_path / "b.png")]
    assert result.predictions[0].trajectory["image_paths"] == [str(tmp_path / "a.png"), str(tmp_path / "b.png")]
