"""ThymeAgent: the public API a user calls."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import thyme
from thyme import AgentConfig, ThymeAgent
from thyme.backends.scripted import ScriptedBackend
from thyme.errors import ConfigError, ImageError, ModelNotFoundError
from thyme.loop import Finished, TextGenerated

EXAMPLES = Path(thyme.__file__).parent / "data" / "examples"
CROP_CODE = (
    "<code>\n```python\nimport cv2\nimg = cv2.imread(image_path)\ncrop = img[0:20, 0:30]\n"
    "p = '/mnt/data/temp_processed_images/crop.png'\ncv2.imwrite(p, crop)\nprint(p)\n```\n</code>"
)


def test_answer_the_readme_example(sandbox):
    agent = ThymeAgent(ScriptedBackend(EXAMPLES / "readme_17127.json"), sandbox=sandbox)
    result = agent.answer(EXAMPLES / "17127.jpg", "What is the plate number?")
    assert result.answer == "C. S QT 911"
    assert [p.__class__.__name__ for p in result.trajectory.parts()] == [
        "Prose",
        "Code",
        "SandboxOutput",
        "Prose",
        "Answer",
    ]
    assert Image.open(result.trajectory.sandbox_images[0]).size == (220, 128)


@pytest.mark.parametrize("kind", ["pil", "numpy"])
def test_in_memory_images_reach_the_sandbox_and_are_cleaned_up(sandbox, tmp_path, kind):
    pixels = np.zeros((40, 50, 3), dtype=np.uint8)
    pixels[:, :, 0] = 255
    image = Image.fromarray(pixels) if kind == "pil" else pixels
    config = AgentConfig(images_dir=tmp_path / "kept")
    agent = ThymeAgent(ScriptedBackend([CROP_CODE, "<answer>red</answer>"]), config=config, sandbox=sandbox)
    events = list(agent.stream(image, "Which color?"))
    result = events[-1].result
    assert result.answer == "red"
    input_path = result.trajectory.image_paths[0]
    assert not Path(input_path).exists()  # our temporary copy is gone after the run
    [crop] = result.trajectory.sandbox_images
    assert Path(crop).parent == tmp_path / "kept"
    with Image.open(crop) as saved:
        assert saved.size == (50, 40)  # the 30x20 slice grew to the 64-px minimum, clamped to the 50x40 image
        assert saved.convert("RGB").getpixel((0, 0)) == (255, 0, 0)
    assert '### User Image Size:** "50x40"' in result.trajectory.user_text


def test_bad_inputs_raise_clear_errors(sandbox, tmp_path):
    agent = ThymeAgent(ScriptedBackend(["<answer>x</answer>"]), sandbox=sandbox)
    with pytest.raises(ConfigError, match="the question is empty"):
        agent.answer(EXAMPLES / "17127.jpg", "   ")
    with pytest.raises(ImageError, match="image not found"):
        agent.answer(tmp_path / "missing.jpg", "Q?")
    (tmp_path / "fake.jpg").write_bytes(b"not an image")
    with pytest.raises(ImageError, match="not an image"):
        agent.answer(tmp_path / "fake.jpg", "Q?")
    # The agent keeps working after bad input.
    assert agent.answer(EXAMPLES / "17127.jpg", "Q?").answer == "x"


def test_from_pretrained_missing_path_says_how_to_get_weights(tmp_path):
    with pytest.raises(ModelNotFoundError, match=r"does-not-exist does not exist: download the weights first"):
        ThymeAgent.from_pretrained(str(tmp_path / "does-not-exist"))


def test_from_pretrained_loads_the_tiny_model_and_generates(tiny_model_dir, sandbox, tmp_path):
    image = tmp_path / "in.png"
    Image.new("RGB", (56, 56), (9, 9, 9)).save(image)
    config = AgentConfig(max_new_tokens=4, max_generation_calls=1, max_attempts=1, use_fallback=False)
    with ThymeAgent.from_pretrained(tiny_model_dir, config=config, sandbox=sandbox, device="cpu") as agent:
        events = list(agent.stream(image, "Q?"))
    generated = [e for e in events if isinstance(e, TextGenerated)]
    assert isinstance(events[-1], Finished) and events[-1].result.generation_calls == 1
    assert not generated or generated[0].segment.generation.token_ids


def test_context_manager_closes_the_sandbox_it_created():
    backend = ScriptedBackend(["<answer>x</answer>"])
    with ThymeAgent(backend) as agent:
        result = agent.answer(EXAMPLES / "17127.jpg", "Q?")
        sandbox = agent.sandbox
    assert result.answer == "x"
    assert agent._sandbox is None
    from thyme.sandbox.errors import SandboxClosed

    with pytest.raises(SandboxClosed):
        sandbox.session(image=str(EXAMPLES / "17127.jpg"))


def test_import_thyme_does_not_import_torch():
    code = "import sys, thyme; thyme.ThymeAgent; thyme.Trajectory; print(json.dumps('torch' in sys.modules))"
    out = subprocess.run([sys.executable, "-c", "import json; " + code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) is False


def test_all_matches_the_public_names():
    names = {name for name in dir(thyme) if not name.startswith("_")} - {
        "annotations",
        "importlib",
        "TYPE_CHECKING",
        "Any",
        "errors",
    }
    assert set(thyme.__all__) - {"__version__"} == names
    for name in thyme.__all__:
        assert getattr(thyme, name) is not None


def test_a_shared_images_dir_never_overwrites_earlier_images(sandbox, tmp_path):
    config = AgentConfig(images_dir=tmp_path / "kept")
    crops = []
    for color in ((255, 0, 0), (0, 0, 255)):
        image = Image.new("RGB", (50, 40), color)
        agent = ThymeAgent(ScriptedBackend([CROP_CODE, "<answer>x</answer>"]), config=config, sandbox=sandbox)
        crops += agent.answer(image, "Which color?").trajectory.sandbox_images
    assert len(set(crops)) == 2
    assert [Image.open(c).convert("RGB").getpixel((0, 0)) for c in crops] == [(255, 0, 0), (0, 0, 255)]
