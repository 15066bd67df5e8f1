"""The labels the SFT collator gives a real multi-round sample on the tiny Qwen2.5-VL processor: exactly which tokens
train (the last code round and the answer) and which are masked (prompt, first round, every sandbox output)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.fixtures.sft_rows import ANSWER, FIRST_ROUND, SANDBOX_TEXT, SECOND_ROUND, sft_response
from thyme.train.masking import IGNORE_INDEX

# A boundary token may carry one character of a neighbouring tag (masking.py docstring), never more.
MAX_BOUNDARY_CHARS = 1


@pytest.fixture(scope="module")
def processor(tiny_model_dir: Path):
    from thyme.backends.processor import load_processor
    from thyme.tiny import TINY_MAX_PIXELS, TINY_MIN_PIXELS

    return load_processor(tiny_model_dir, TINY_MIN_PIXELS, TINY_MAX_PIXELS)


@pytest.fixture(scope="module")
def row(sft_jsonl: Path) -> dict:
    raw = json.loads(sft_jsonl.read_text(encoding="utf-8").splitlines()[0])
    raw["image"] = [str(sft_jsonl.parent / name) for name in raw["image"]]
    return raw


def _runs(processor, ids: list[int], flags: list[bool]) -> list[str]:
    """Decodes each maximal run of consecutive flagged tokens."""
    runs, current = [], []
    for token, flag in zip(ids, flags, strict=True):
        if flag:
            current.append(token)
        elif current:
            runs.append(processor.tokenizer.decode(current))
            current = []
    if current:
        runs.append(processor.tokenizer.decode(current))
    return runs


def _assert_run_is(run: str, expected: str) -> None:
    assert expected in run, f"{expected!r} not in trained run {run!r}"
    assert len(run) - len(expected) <= 2 * MAX_BOUNDARY_CHARS, f"trained run {run!r} holds more than {expected!r}"


def _collate(processor, row: dict, **switches) -> tuple[list[int], list[int], list[int]]:
    from thyme.train.sft_collator import ThymeSFTCollator

    batch = ThymeSFTCollator(processor, **switches)([row])
    return batch["input_ids"][0].tolist(), batch["labels"][0].tolist(), batch["mm_token_type_ids"][0].tolist()


def test_labels_train_only_the_last_round_and_the_answer(processor, row: dict) -> None:
    ids, labels, image_flags = _collate(processor, row)
    trained = [label != IGNORE_INDEX for label in labels]
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(ids, labels, strict=True))

    runs = _runs(processor, ids, trained)
    assert len(runs) == 2
    _assert_run_is(runs[0], SECOND_ROUND)
    _assert_run_is(runs[1], ANSWER + "<|im_end|>")

    masked = "".join(_runs(processor, ids, [not flag for flag in trained]))
    assert FIRST_ROUND in masked and "What color is the sign?" in masked and "You are a helpful assistant." in masked
    # Three images (input, crop 1, crop 2) reached the sequence, and none of their tokens is trained.
    assert masked.count("<|vision_start|>") == 3
    assert sum(image_flags) > 3
    assert not any(flag and train for flag, train in zip(image_flags, trained, strict=True))


def test_labels_without_last_round_only_train_every_round_but_no_sandbox_output(processor, row: dict) -> None:
    text_row = dict(row, response=sft_response(text_result=True), image=[row["image"][0], row["image"][2]])
    ids, labels, image_flags = _collate(processor, text_row, last_round_only=False)
    trained = [label != IGNORE_INDEX for label in labels]
    runs = _runs(processor, ids, trained)
    assert len(runs) == 3
    _assert_run_is(runs[0], FIRST_ROUND)
    _assert_run_is(runs[1], SECOND_ROUND)
    _assert_run_is(runs[2], ANSWER + "<|im_end|>")
    trained_text = "".join(runs)
    assert SANDBOX_TEXT not in trained_text and "sandbox_output" not in trained_text
    assert not any(flag and train for flag, train in zip(image_flags, trained, strict=True))


def test_naive_sft_trains_the_sandbox_images(processor, row: dict) -> None:
    ids, labels, image_flags = _collate(processor, row, last_round_only=False, mask_sandbox_output=False)
    trained = [label != IGNORE_INDEX for label in labels]
    runs = _runs(processor, ids, trained)
    assert len(runs) == 1 and runs[0].count("<|vision_start|>") == 2
    # The input image (in the prompt) stays masked; the two sandbox images' tokens train.
    trained_image_tokens = sum(flag and train for flag, train in zip(image_flags, trained, strict=True))
    assert 0 < trained_image_tokens < sum(image_flags)


def test_collator_rejects_sequences_over_max_length(processor, row: dict) -> None:
    from thyme.errors import ConfigError
    from thyme.train.sft_collator import ThymeSFTCollator

    collator = ThymeSFTCollator(processor, max_length=64)
    length = collator.sequence_length(row)
    assert length == len(_collate(processor, row)[0])
    with pytest.raises(ConfigError, match=rf"has {length} tokens > max_length \(64\)"):
        collator([row])


def test_drop_overlong_removes_only_rows_over_max_length(processor, row: dict, caplog) -> None:
    from datasets import Dataset

    from thyme.train.sft_collator import ThymeSFTCollator

    long_row = dict(row, question=row["question"].replace("What color", "What color " + "exactly " * 200))
    short = ThymeSFTCollator(processor).sequence_length(row)
    collator = ThymeSFTCollator(processor, max_length=short + 10)
    kept = collator.drop_overlong(Dataset.from_list([row, long_row, row]))
    assert len(kept) == 2 and all(r["question"] == row["question"] for r in kept)
    assert "dropped 1 of 3 rows longer than max_length" in caplog.text


def test_readme_example_converted_from_released_form_trains_code_and_answer(processor, tmp_path: Path) -> None:
    """The original README trajectory (17127.jpg, its real crop), as a released row with base64 images and the
    authors' path, goes through `convert_files` and the collator: the local path reaches the prompt and the code,
    the 2496x1392 photo and its 220x128 crop are both in the batch, and only model text is trained."""
    import base64
    from importlib import resources

    from thyme.prompts import user_prompt
    from thyme.protocol import IMAGE_PLACEHOLDER, SANDBOX_OUTPUT_CLOSE, SANDBOX_OUTPUT_OPEN
    from thyme.train.sft_collator import ThymeSFTCollator
    from thyme.train.sft_data import convert_files

    examples = resources.files("thyme").joinpath("data", "examples")
    example = json.loads(examples.joinpath("readme_17127.json").read_text(encoding="utf-8"))
    photo = examples.joinpath(example["image"]).read_bytes()
    crop = (Path(__file__).resolve().parents[1] / "data" / "17127_ebd8fd46.jpg").read_bytes()
    first, second = example["segments"]
    released = {
        "image": [base64.b64encode(photo).decode(), base64.b64encode(crop).decode()],
        "question": user_prompt(example["question"], "/mllm_hdd/yfzhang/data/eval/17127.jpg", 2496, 1392),
        "response": first + SANDBOX_OUTPUT_OPEN + IMAGE_PLACEHOLDER + SANDBOX_OUTPUT_CLOSE + second,
    }
    (tmp_path / "released.jsonl").write_text(json.dumps(released) + "\n", encoding="utf-8")
    convert_files([tmp_path / "released.jsonl"], tmp_path / "sft.jsonl")
    row = json.loads((tmp_path / "sft.jsonl").read_text(encoding="utf-8"))
    local = row["image"][0]
    assert Path(local).read_bytes() == photo and f'image_path = "{local}"' in row["response"]

    batch = ThymeSFTCollator(processor)([row])
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    assert batch["image_grid_thw"].shape[0] == 2
    runs = _runs(processor, ids, [label != IGNORE_INDEX for label in labels])
    rewritten_first = first.replace("/eval/17127.jpg", local)
    assert len(runs) == 2
    _assert_run_is(runs[0], rewritten_first)
    _assert_run_is(runs[1], second + "<|im_end|>")
