"""Toolkit adapters: the shared answerer, VLMEvalKit prompt building and generate_inner, the lmms-eval wrapper."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from PIL import Image

from thyme.backends.scripted import ScriptedBackend
from thyme.errors import ConfigError
from thyme.evaluation.adapters.answerer import ToolkitAnswerer, agent_config_from_strings
from thyme.evaluation.adapters.vlmevalkit import ThymeVLM, build_question

README_ANSWER = "<think>The plate is readable.</think>\n<answer> **C. S QT 911** </answer>"


def test_answerer_thyme_mode_takes_a_pil_image() -> None:
    backend = ScriptedBackend([README_ANSWER])
    answerer = ToolkitAnswerer(backend=backend)
    assert answerer.answer(Image.new("RGB", (64, 48), "blue"), "Which plate?") == "C. S QT 911"
    user_text = backend.calls[0].messages[1]["content"][-1]["text"]
    assert "Which plate?" in user_text and '"64x48"' in user_text  # the Thyme user template, original size
    answerer.close()


def test_answerer_direct_mode_is_one_plain_call(tmp_path: Path) -> None:
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    backend = ScriptedBackend(["It is C."])
    answerer = ToolkitAnswerer(backend=backend, mode="direct", max_new_tokens="16")
    assert answerer.answer(str(tmp_path / "a.png"), "Which plate?") == "It is C."
    (call,) = backend.calls
    assert [m["role"] for m in call.messages] == ["user"] and call.sampling.max_new_tokens == 16


def test_answerer_options_come_as_strings_and_are_checked() -> None:
    config = agent_config_from_strings({"max_generation_calls": "3", "use_fallback": "False", "seed": "7"})
    assert (config.max_generation_calls, config.use_fallback, config.seed) == (3, False, 7)
    with pytest.raises(ConfigError, match="unknown Thyme option\\(s\\) max_turns; valid: "):
        agent_config_from_strings({"max_turns": "3"})
    with pytest.raises(ConfigError, match="use_fallback='maybe': expected true or false"):
        agent_config_from_strings({"use_fallback": "maybe"})
    with pytest.raises(ConfigError, match="give exactly one of model_path"):
        ToolkitAnswerer(model_path="x", endpoint="http://127.0.0.1:1/v1")
    with pytest.raises(ConfigError, match="mode \\('tools'\\) must be one of thyme, direct"):
        ToolkitAnswerer(backend=ScriptedBackend(["x"]), mode="tools")


def test_vlmevalkit_build_question_matches_the_thyme_mixin() -> None:
    line = {"question": "What is the plate number?", "hint": math.nan, "A": "S OT 911", "B": "S QT 911", "C": math.nan}
    assert build_question(line, "MCQ", "HRBench4K") == (
        "Question: What is the plate number?\nOptions:\nA. S OT 911\nB. S QT 911\n"
        "Please select the correct answer from the options above."
    )
    assert build_question({"question": "Is it red?"}, "Y/N", "POPE") == "Is it red? Please answer yes or no."
    assert build_question({"question": "Is it red?"}, "Y/N", "MME") == "Is it red?"
    assert build_question({"question": "Why?"}, "VQA", "MMVet") == "Why?"
    assert build_question({"question": "Why?"}, "VQA", "OCRVQA").endswith("short words or phrases if possible.")
    assert build_question({"question": "What?", "hint": "Look left."}, "MCQ", "X").startswith("Hint: Look left.\n")


def test_vlmevalkit_generate_inner_answers_with_every_image(tmp_path: Path) -> None:
    for name in ("a.png", "b.png"):
        Image.new("RGB", (32, 32)).save(tmp_path / name)
    backend = ScriptedBackend([README_ANSWER])
    model = ThymeVLM(backend=backend)
    message = [
        {"type": "image", "value": str(tmp_path / "a.png")},
        {"type": "image", "value": str(tmp_path / "b.png")},
        {"type": "text", "value": "Which plate?"},
    ]
    assert model.generate_inner(message, dataset="HRBench4K") == "C. S QT 911"
    user = backend.calls[0].messages[1]["content"]
    assert [item.get("image") for item in user[:2]] == [str(tmp_path / "a.png"), str(tmp_path / "b.png")]
    with pytest.raises(ValueError, match="Thyme needs an image"):
        model.generate_inner([{"type": "text", "value": "q"}])


def test_lmms_eval_wrapper_answers_requests() -> None:
    pytest.importorskip("lmms_eval", reason="lmms-eval is an optional toolkit, not installed here")
    from lmms_eval.api.instance import Instance

    from thyme.evaluation.adapters.lmms import ThymeLMMs, lmms_eval_manifest

    model = ThymeLMMs(backend=ScriptedBackend([README_ANSWER]))
    model.task_dict = {"vstar": {"test": {0: {"image": Image.new("RGB", (40, 40))}}}}
    request = Instance(
        request_type="generate_until",
        arguments=("Which plate?", {}, lambda doc: [doc["image"]], 0, "vstar", "test"),
        idx=0,
        metadata={"task": "vstar", "doc_id": 0, "repeats": 1},
    )
    assert model.generate_until([request]) == ["C. S QT 911"]
    assert lmms_eval_manifest().simple_class_path == "thyme.evaluation.adapters.lmms.ThymeLMMs"
