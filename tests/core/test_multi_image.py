"""Several images for one question: the prompt names them all, the sandbox session gets them all, the model sees
them all (counted in image tokens on the tiny model), through the agent, the CLI and the loop."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from PIL import Image

from thyme import AgentConfig, ThymeAgent
from thyme.backends.base import FINISH_STOP, Generation, SamplingParams
from thyme.backends.scripted import ScriptedBackend
from thyme.cli import main
from thyme.errors import ConfigError, ImageError
from thyme.prompts import user_prompt, user_prompt_images

_PATH_LINE = re.compile(r'### User Image Path:\*\* "([^"]+)"')


@pytest.fixture
def two_images(tmp_path: Path) -> list[Path]:
    red, blue = tmp_path / "red.png", tmp_path / "blue.png"
    Image.new("RGB", (80, 60), (255, 0, 0)).save(red)
    Image.new("RGB", (120, 90), (0, 0, 255)).save(blue)
    return [red, blue]


def test_one_image_renders_the_released_template_and_several_repeat_its_path_and_size_lines() -> None:
    assert user_prompt_images("Q?", [("/a.jpg", 640, 480)]) == user_prompt("Q?", "/a.jpg", 640, 480)
    text = user_prompt_images("Same car?", [("/a.jpg", 640, 480), ("/b.jpg", None, None)])
    assert text.startswith("<image>\nSame car?\n\n") and text.count("<image>") == 1
    assert (
        '### User Image Path:** "/a.jpg"\n### User Image Size:** "640x480"\n'
        '### User Image Path:** "/b.jpg"\n### User Image Size:** "Unable to determine (error reading image)"\n\n'
        "### **Output Format"
    ) in text


class _CodeForSecondImage:
    """A model that reads the second path from its prompt, as the released model reads the first, and crops it."""

    def __init__(self) -> None:
        self.calls: list[list[dict]] = []

    def generate(self, messages: list[dict], *, stop, sampling: SamplingParams) -> Generation:
        self.calls.append(messages)
        if len(self.calls) == 1:
            second = _PATH_LINE.findall(messages[1]["content"][-1]["text"])[1]
            text = (
                "<think>The second image.<code>\n```python\nfrom PIL import Image\n"
                f"img = Image.open({second!r})\nprint(img.size)\n"
                "p = '/mnt/data/temp_processed_images/second.png'\nimg.crop((0, 0, 100, 80)).save(p)\nprint(p)\n```\n"
                "</code>"
            )
        else:
            text = "It is blue.</think>\n<answer>blue</answer>"
        return Generation(text=text, finish_reason=FINISH_STOP, prompt_tokens=1)

    def close(self) -> None:
        pass


def test_agent_answers_about_two_images_and_the_code_opens_the_second(sandbox, two_images, tmp_path) -> None:
    backend = _CodeForSecondImage()
    agent = ThymeAgent(backend, config=AgentConfig(images_dir=tmp_path / "kept"), sandbox=sandbox)
    result = agent.answer(two_images, "Which image is blue?")
    assert result.answer == "blue" and result.code_runs == 1 and result.code_errors == 0
    trajectory = result.trajectory
    assert trajectory.image_paths == [str(path) for path in two_images]  # the model sees both originals
    first_user = backend.calls[0][1]["content"]
    assert [item["type"] for item in first_user] == ["image", "image", "text"]
    assert '### User Image Size:** "80x60"' in trajectory.user_text
    assert '### User Image Size:** "120x90"' in trajectory.user_text
    named = _PATH_LINE.findall(trajectory.user_text)
    assert [Path(p).name for p in named] == ["red.png", "blue.png"] and named[0] != str(
        two_images[0]
    )  # session copies
    [crop] = trajectory.sandbox_images
    with Image.open(crop) as image:
        assert image.convert("RGB").getpixel((5, 5)) == (0, 0, 255)  # cut from the second image
        assert image.size == (100, 80)  # not clamped to the first image's 80x60


def test_the_same_file_twice_and_bad_inputs(sandbox, two_images) -> None:
    agent = ThymeAgent(ScriptedBackend(["<answer>same</answer>"]), sandbox=sandbox)
    result = agent.answer([two_images[0], two_images[0]], "Are these the same?")
    assert len(_PATH_LINE.findall(result.trajectory.user_text)) == 2 and result.answer == "same"
    with pytest.raises(ConfigError, match="no image given"):
        agent.answer([], "q")
    with pytest.raises(ImageError, match="image not found"):
        agent.answer([two_images[0], two_images[0].parent / "missing.png"], "q")


def test_answer_cli_takes_several_images_then_the_question(two_images, tmp_path, capsys) -> None:
    script = tmp_path / "s.json"
    script.write_text(json.dumps(["<answer>two</answer>"]))
    argv = ["answer", *map(str, two_images), "How many images?", "--scripted", str(script), "--json"]
    assert main(argv) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["answer"] == "two" and data["trajectory"]["image_paths"] == [str(p) for p in two_images]
    script.write_text(json.dumps(["<answer>two</answer>"]))
    assert main(["answer", *map(str, two_images), "-q", "How many?", "--scripted", str(script), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["trajectory"]["image_paths"] == [str(p) for p in two_images]
    assert main(["answer", str(two_images[0]), "--scripted", str(script)]) == 1
    assert "give the image(s) and then the question" in capsys.readouterr().err


@pytest.mark.slow
def test_tiny_model_encodes_both_images(tiny_model_dir: Path, sandbox, two_images, tmp_path) -> None:
    from thyme.backends.local import TransformersBackend
    from thyme.backends.processor import image_factor
    from thyme.backends.vision_inputs import smart_resize

    backend = TransformersBackend.from_pretrained(tiny_model_dir, device="cpu")
    seen: list[list[dict]] = []
    generate = backend.generate

    def recording(messages, **kwargs):
        seen.append(messages)
        return generate(messages, **kwargs)

    backend.generate = recording
    config = AgentConfig(max_generation_calls=1, max_new_tokens=4, max_attempts=1, use_fallback=False)
    with ThymeAgent(backend, config=config, sandbox=sandbox) as agent:
        agent.answer(two_images, "Which is blue?")
        inputs = backend.prepare_inputs(seen[0])
    factor = image_factor(backend.processor)
    expected = 0
    for path in two_images:
        with Image.open(path) as image:
            height, width = smart_resize(image.height, image.width, factor=factor)
        expected += (height // factor) * (width // factor)
    image_token = backend.processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert int((inputs["input_ids"] == image_token).sum()) == expected
    assert len(inputs["image_grid_thw"]) == 2
