"""Trajectory rendering, parsing and JSON round trips, on the README example of the original repo."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import thyme
from thyme.backends.base import Generation, SamplingParams
from thyme.errors import ProtocolError
from thyme.prompts import SYSTEM_PROMPT, user_prompt, user_text_item
from thyme.trajectory import Answer, Code, ModelText, Prose, SandboxOutput, Trajectory, parse_assistant_content

PACKAGE_DATA = Path(thyme.__file__).parent / "data" / "examples"
CROP = str(Path(__file__).parents[1] / "data" / "17127_ebd8fd46.jpg")


@pytest.fixture
def example() -> dict:
    return json.loads((PACKAGE_DATA / "readme_17127.json").read_text(encoding="utf-8"))


@pytest.fixture
def readme_trajectory(example) -> Trajectory:
    image = str(PACKAGE_DATA / "17127.jpg")
    prompt = user_prompt(example["question"], image, 2496, 1392)
    first, second = example["segments"]
    return Trajectory(
        system_prompt=SYSTEM_PROMPT,
        user_text=user_text_item(prompt),
        image_paths=[image],
        segments=[
            ModelText(first, Generation(first, "stop", 1234, [1, 2], [-0.5, -0.25]), SamplingParams()),
            SandboxOutput(images=[CROP], stdout=f"{CROP}\n"),
            ModelText(second, Generation(second, "stop", 80), SamplingParams()),
        ],
        image_options={"min_pixels": 3136, "max_pixels": 12845056},
        question=example["question"],
    )


def test_to_messages_appends_the_sandbox_output_inside_the_assistant_message(readme_trajectory, example):
    messages = readme_trajectory.to_messages()
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]
    user = messages[1]["content"]
    assert user[0] == {
        "type": "image",
        "image": readme_trajectory.image_paths[0],
        "min_pixels": 3136,
        "max_pixels": 12845056,
    }
    assert user[1]["text"].startswith("\nQuestion: What is the plate number")
    first, second = example["segments"]
    assert messages[2]["content"] == [
        {"type": "text", "text": first + "<sandbox_output>"},
        {"type": "image", "image": CROP, "min_pixels": 3136, "max_pixels": 12845056},
        {"type": "text", "text": "</sandbox_output>" + second},
    ]


def test_text_result_and_error_are_shown_between_the_tags_without_whitespace():
    trajectory = Trajectory(
        "s",
        "u",
        ["/in.jpg"],
        [
            ModelText("a</code>"),
            SandboxOutput(text="42"),
            ModelText("b</code>"),
            SandboxOutput(error="Sandbox for 1: boom"),
        ],
    )
    assert (
        trajectory.text
        == "a</code><sandbox_output>42</sandbox_output>b</code><sandbox_output>Sandbox for 1: boom</sandbox_output>"
    )


def test_without_segments_there_is_no_assistant_message():
    assert [m["role"] for m in Trajectory("s", "u", ["/in.jpg"]).to_messages()] == ["system", "user"]


def test_messages_round_trip(readme_trajectory):
    parsed = Trajectory.from_messages(readme_trajectory.to_messages())
    assert parsed.to_messages() == readme_trajectory.to_messages()
    assert [type(s) for s in parsed.segments] == [ModelText, SandboxOutput, ModelText]
    assert parsed.segments[1].images == [CROP]
    assert parsed.image_options == readme_trajectory.image_options


def test_json_round_trip_keeps_generations(readme_trajectory, tmp_path):
    path = readme_trajectory.save(tmp_path / "t.json")
    loaded = Trajectory.load(path)
    assert loaded == readme_trajectory
    assert loaded.generations[0].logprobs == [-0.5, -0.25]
    assert json.loads(path.read_text(encoding="utf-8"))["answer"] == "C. S QT 911"


def test_parts_answer_and_images(readme_trajectory, example):
    parts = readme_trajectory.parts()
    assert [type(p) for p in parts] == [Prose, Code, SandboxOutput, Prose, Answer]
    assert parts[1].code == example["code"]
    assert parts[4] == Answer("<answer> **C. S QT 911** </answer>", "C. S QT 911")
    assert readme_trajectory.answer == "C. S QT 911"
    assert readme_trajectory.sandbox_images == [CROP]
    rendered = "".join("<sandbox_output></sandbox_output>" if isinstance(p, SandboxOutput) else p.text for p in parts)
    assert rendered == readme_trajectory.text


def test_parts_join_a_code_block_split_over_two_calls():
    """Under ATS the prose call ends with <code> and the greedy call brings the body."""
    trajectory = Trajectory(
        "s", "u", ["/in.jpg"], [ModelText("look <code>"), ModelText("\n```python\nx=1\n```\n</code>")]
    )
    assert trajectory.parts() == [Prose("look "), Code("<code>\n```python\nx=1\n```\n</code>", "x=1")]


def test_missing_answer():
    trajectory = Trajectory("s", "u", ["/in.jpg"], [ModelText("<think>hmm")])
    assert trajectory.answer is None
    assert trajectory.answer_or_missing == "No answer tag found in the final output."


def test_parse_plain_text_with_image_placeholders(example):
    first, second = example["segments"]
    text = first + "<sandbox_output><image></sandbox_output>" + second
    segments = parse_assistant_content(text, images=[CROP])
    assert segments == [ModelText(first), SandboxOutput(images=[CROP]), ModelText(second)]


def test_parse_rejects_malformed_content():
    with pytest.raises(ProtocolError, match="never closes"):
        parse_assistant_content("a<sandbox_output>b")
    with pytest.raises(ProtocolError, match="more <image> placeholders"):
        parse_assistant_content("<sandbox_output><image></sandbox_output>", images=[])
    with pytest.raises(ProtocolError, match="outside a sandbox output"):
        parse_assistant_content([{"type": "image", "image": "/x.png"}])
    with pytest.raises(ProtocolError, match="roles"):
        Trajectory.from_messages([{"role": "user", "content": []}])


def test_load_rejects_non_trajectories(tmp_path):
    (tmp_path / "bad.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ProtocolError, match="cannot read trajectory"):
        Trajectory.load(tmp_path / "bad.json")
    with pytest.raises(ProtocolError, match="not a Thyme trajectory"):
        Trajectory.from_dict({"segments": []})
