"""The prompts must match the released weights' training text byte for byte (reference 1.2)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from thyme import prompts
from thyme.prompts import (
    FALLBACK_SYSTEM_PROMPT,
    SYSTEM_PROMPT,
    fallback_prompt,
    format_mcq,
    format_vqa,
    format_yes_no,
    user_prompt,
    user_text_item,
)

DATA = Path(__file__).parents[1] / "data"
EXAMPLE = Path(prompts.__file__).parent / "data" / "examples" / "readme_17127.json"


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def test_system_prompt_is_the_released_one():
    assert _sha256(SYSTEM_PROMPT) == "c5e7db63596377f9a1afef0dd131d282b2f9e6c873058c056c5c0aa5a89f99a7"
    assert len(SYSTEM_PROMPT) == 1059 and not SYSTEM_PROMPT.endswith("\n")


def test_user_prompt_renders_the_official_test_vector():
    text = user_prompt("What is the color of the car?", "/tmp/ex.jpg", 640, 480)
    assert text == (DATA / "user_prompt_example.txt").read_text(encoding="utf-8")
    assert len(text) == 315
    assert _sha256(text) == "0a39c13a54d05f498bcb8f3ce7d77db37a7f75b36d683a816fb5d4660f18a132"


def test_user_prompt_unknown_size_variant():
    text = user_prompt("Q?", "/x.jpg", None, None)
    assert '### User Image Size:** "Unable to determine (error reading image)"\n' in text


def test_user_text_item_places_the_question_after_the_vision_block():
    prompt = user_prompt("Q?", "/x.jpg", 2, 3)
    assert user_text_item(prompt) == prompt[len("<image>") :]
    assert user_text_item(prompt).startswith("\nQ?\n\n### User Image Path")
    assert user_text_item(prompt, eval_image_quirk=True).startswith("<image>\nQ?")


def test_fallback_prompt_text():
    assert FALLBACK_SYSTEM_PROMPT == "You are a helpful assistant."
    assert fallback_prompt('red "car"') == (
        "\nYou are an advanced AI assistant specializing in visual question answering (VQA). You don't need to "
        "perform any image manipulation or reasoning. Give the answer to the following question directly.\n"
        '**User\'s Question:** "red "car""\n'
    )


def test_format_mcq_reproduces_the_readme_question():
    example = json.loads(EXAMPLE.read_text(encoding="utf-8"))
    question = "What is the plate number of the blue car in the picture?"
    assert format_mcq(question, example["options"]) == example["question"]


def test_format_mcq_hint_and_cjk_instruction():
    text = format_mcq("哪个？", {"A": "红", "B": "蓝"}, hint="看车")
    assert text == "Hint: 看车\nQuestion: 哪个？\nOptions:\nA. 红\nB. 蓝\n请直接回答选项字母。"
    assert format_mcq("Q", {}) == "Question: Q"


def test_format_yes_no_and_vqa():
    assert format_yes_no("Is it red?") == "Is it red? Please answer yes or no."
    assert format_yes_no("Is it red?", add_instruction=False) == "Is it red?"
    assert format_vqa("Color?") == "Color?\nPlease try to answer the question with short words or phrases if possible."
    assert format_vqa("Color?", add_instruction=False) == "Color?"
