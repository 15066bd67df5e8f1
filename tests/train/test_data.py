"""RL data: Thyme-RL rows and plain {image, question, answer} rows become TRL rows; missing images are all named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from thyme.errors import ConfigError
from thyme.prompts import SYSTEM_PROMPT
from thyme.train.data import check_images, load_rl_dataset, read_rows, to_trl_row


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n", encoding="utf-8")
    return path


def test_thyme_rl_row_keeps_its_messages_and_solution(readme_image):
    row = {
        "messages": [
            {"role": "system", "content": "SYS"},
            {"role": "user", "content": "<image>\nWhat is the plate number?"},
        ],
        "images": [{"path": readme_image, "bytes": None}],
        "solution": "<answer>C</answer>",
        "question": "What is the plate number?",
    }
    out = to_trl_row(row, "row 0", None)
    assert out["prompt"] == [
        {"role": "system", "content": "SYS"},
        {"role": "user", "content": "\nWhat is the plate number?"},
    ]
    assert out["image"] == readme_image
    assert (out["question"], out["solution"]) == ("What is the plate number?", "<answer>C</answer>")
    assert out["prompt_question"] == "What is the plate number?"


def test_thyme_rl_prompt_question_drops_the_template_of_the_authors_machine(readme_image):
    user = (
        '<image>\nWhich?\nA. x\nB. y\n\n### User Image Path:** "/mllm_hdd/yfzhang/a.jpg"\n### User Image Size:** "9x9"'
    )
    row = {"messages": [{"role": "user", "content": user}], "images": [readme_image], "solution": "B"}
    out = to_trl_row(row, "row 0", None)
    assert out["prompt_question"] == "Which?\nA. x\nB. y"
    assert out["question"] == out["prompt_question"]  # no raw question column: the shown one
    assert out["prompt"][0] == {"role": "system", "content": SYSTEM_PROMPT}


def test_plain_row_gets_the_official_prompts_with_the_original_size(readme_image):
    out = to_trl_row({"image": readme_image, "question": "Which color?", "answer": "red"}, "row 0", None)
    system, user = out["prompt"]
    assert system == {"role": "system", "content": SYSTEM_PROMPT}
    assert user["content"].startswith("\nWhich color?\n\n")
    assert f'### User Image Path:** "{readme_image}"' in user["content"]
    assert '### User Image Size:** "2496x1392"' in user["content"]
    assert out["solution"] == "red"


def test_relative_paths_resolve_against_the_data_folder(tmp_path, readme_image):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.jpg").write_bytes(Path(readme_image).read_bytes())
    data = _write_jsonl(tmp_path / "rl.jsonl", [{"image": "imgs/a.jpg", "question": "q", "answer": "a"}])
    dataset = load_rl_dataset(data)
    assert dataset[0]["image"] == str(tmp_path / "imgs" / "a.jpg")
    assert set(dataset.column_names) == {"prompt", "image", "question", "prompt_question", "solution"}


def test_missing_images_are_all_listed_before_training(tmp_path):
    rows = [{"image": f"gone{i}.jpg", "question": "q", "answer": "a"} for i in range(3)]
    data = _write_jsonl(tmp_path / "rl.jsonl", rows)
    with pytest.raises(ConfigError) as info:
        load_rl_dataset(data)
    message = str(info.value)
    assert message.startswith("3 of 3 dataset images do not exist")
    for i in range(3):
        assert str(tmp_path / f"gone{i}.jpg") in message
    assert "image_root" in message


def test_check_images_caps_the_list(tmp_path):
    rows = [{"image": str(tmp_path / f"x{i}.jpg")} for i in range(25)]
    with pytest.raises(ConfigError, match=r"\.\.\. and 5 more"):
        check_images(rows)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"question": "q", "answer": "a"}, "no image"),
        ({"image": "x.jpg", "answer": "a"}, "expected Thyme-RL 'messages' or a plain row with 'question'"),
        ({"image": "x.jpg", "question": "q"}, "no reference answer"),
    ],
)
def test_malformed_rows_name_the_row(row, message):
    with pytest.raises(ConfigError, match=message) as info:
        to_trl_row(row, "data.jsonl row 7", None)
    assert "data.jsonl row 7" in str(info.value)


def test_read_rows_accepts_a_json_list_and_a_folder(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"k": 1}, {"k": 2}]), encoding="utf-8")
    _write_jsonl(tmp_path / "b.jsonl", [{"k": 3}])
    rows, folder = read_rows(tmp_path)
    assert [row["k"] for row in rows] == [1, 2, 3] and folder == tmp_path
    with pytest.raises(ConfigError, match="does not exist"):
        read_rows(tmp_path / "missing.jsonl")
