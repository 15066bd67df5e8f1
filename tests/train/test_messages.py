"""thyme-train and thyme-train sft speak in the user's terms: the bad key and its type, the line an editor shows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from thyme.errors import ConfigError
from thyme.train import cli
from thyme.train.data import load_rl_dataset

EXAMPLES = Path(cli.__file__).parent / "examples"


def _jsonl_with_bad_line_4(path: Path, good: dict) -> Path:
    lines = [json.dumps(good)] * 3 + ['{"image": "x.jpg", "question": "q", "answer": oops}']
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize(("command", "config"), [([], "tiny_cpu.yaml"), (["sft"], "sft_tiny.yaml")])
def test_train_override_of_the_wrong_type_names_key_and_type(command, config, capsys) -> None:
    """`--override max_steps=abc` was a raw TypeError from deep inside TRL."""
    argv = [*command, str(EXAMPLES / config), "--override", "max_steps=abc"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "max_steps='abc' is not an integer" in err
    assert "Traceback" not in err and err.count("\n") == 1


def test_train_rl_jsonl_error_names_the_bad_line(tmp_path: Path, readme_image: str) -> None:
    data = _jsonl_with_bad_line_4(tmp_path / "rl.jsonl", {"image": readme_image, "question": "q", "answer": "a"})
    with pytest.raises(ConfigError) as info:
        load_rl_dataset(data)
    message = str(info.value)
    assert f"{data}:4: not valid JSON" in message
    assert "line 1" not in message


def test_train_rl_row_error_names_its_file_line(tmp_path: Path, readme_image: str) -> None:
    good, bad = {"image": readme_image, "question": "q", "answer": "a"}, {"image": readme_image, "answer": "a"}
    data = tmp_path / "rl.jsonl"
    data.write_text(json.dumps(good) + "\n\n" + json.dumps(bad) + "\n", encoding="utf-8")  # a blank line 2
    with pytest.raises(ConfigError, match=f"{data}:3: expected Thyme-RL 'messages' or a plain row"):
        load_rl_dataset(data)


@pytest.mark.slow
def test_train_sft_jsonl_error_names_the_bad_line_and_sft_data(tmp_path: Path, tiny_model_dir: Path, capsys) -> None:
    """SFT called its data "Thyme-RL JSON" and named line 1 for a bad line 4."""
    data = _jsonl_with_bad_line_4(tmp_path / "sft.jsonl", {"image": [], "question": "q", "response": "r"})
    argv = ["sft", str(EXAMPLES / "sft_tiny.yaml"), "--override", f"model_name_or_path={tiny_model_dir}",
            "--override", f"train_file={data}", "--override", f"output_dir={tmp_path / 'out'}"]  # fmt: skip
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert f"{data}:4: not valid JSON" in err
    assert "Thyme-RL" not in err and "line 1" not in err
