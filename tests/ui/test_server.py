"""The demo served on 127.0.0.1 and driven with gradio_client, as a user's browser or script would."""

from __future__ import annotations

import io
import json
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
from gradio_client import Client, handle_file
from PIL import Image, ImageOps

from tests.fixtures.demo_app import fetch_file
from thyme.trajectory import Trajectory
from thyme.ui.app import NO_IMAGE, NO_QUESTION, README_SCRIPT, readme_example

pytestmark = pytest.mark.slow

EXAMPLE = json.loads(README_SCRIPT.read_text(encoding="utf-8"))
QUESTION = EXAMPLE["question"]
OFFICIAL_CROP = Path(__file__).resolve().parents[1] / "data" / "17127_ebd8fd46.jpg"


def _ask(client: Client, text: str, image: Path | None = None) -> tuple[list[list[dict]], list[dict], dict]:
    """Sends one message; returns every streamed chat, the final chat and the download button update."""
    files = [handle_file(str(image))] if image else []
    client.predict({"text": text, "files": files}, api_name="/add_message")
    job = client.submit(api_name="/bot_response")
    streamed = [output[0] for output in job]
    chat, download = job.result()
    return streamed, chat, download


def _by_title(chat: list[dict], title: str) -> list[dict]:
    return [message for message in chat if message["metadata"].get("title") == title]


def _content(message: dict) -> list:
    """A message's content items: text strings and file paths."""
    return [item.get("text", item.get("file")) for item in message["content"]]


def _crop(url: str, chat: list[dict]) -> Image.Image:
    (result,) = _by_title(chat, "Sandbox result (step 1)")
    (path,) = _content(result)
    return Image.open(io.BytesIO(fetch_file(url, path))).convert("RGB")


def test_demo_streams_readme_example_and_serves_the_crop(scripted_url, example_image):
    client = Client(scripted_url, verbose=False)
    streamed, chat, download = _ask(client, QUESTION, example_image)

    # It streamed: the code block was on screen before the answer existed.
    assert any(_by_title(c, "Python code (step 1)") and not any("### Answer" in str(m) for m in c) for c in streamed)
    assert [m["role"] for m in chat[:2]] == ["user", "user"]
    (code,) = _by_title(chat, "Python code (step 1)")
    assert _content(code) == [f"```python\n{EXAMPLE['code']}\n```"]
    # The crop the sandbox made is served, at the size of the original's crop and with its pixels.
    crop = _crop(scripted_url, chat)
    official = Image.open(OFFICIAL_CROP).convert("RGB")
    assert list(crop.size) == EXAMPLE["expected_crop_size"] == list(official.size)
    assert np.abs(np.asarray(crop, dtype=int) - np.asarray(official, dtype=int)).mean() < 6  # JPEG re-encoding only
    assert _content(chat[-1]) == ["### Answer\n\nC. S QT 911"]
    assert download["visible"] is True and download["value"].endswith("thyme_trajectory.zip")


def test_demo_download_zip_holds_trajectory_and_its_images(scripted_url, example_image, tmp_path):
    client = Client(scripted_url, verbose=False)
    _, _, download = _ask(client, QUESTION, example_image)
    archive = zipfile.ZipFile(io.BytesIO(fetch_file(scripted_url, download["value"])))
    archive.extractall(tmp_path)
    trajectory = Trajectory.load(tmp_path / "trajectory_1.json")
    assert trajectory.answer == "C. S QT 911"
    assert trajectory.image_paths == ["input/17127.jpg"]
    (crop_name,) = trajectory.sandbox_images
    assert crop_name.startswith("sandbox/")
    assert Image.open(tmp_path / crop_name).size == tuple(EXAMPLE["expected_crop_size"])
    assert (tmp_path / "input/17127.jpg").read_bytes() == example_image.read_bytes()


def test_demo_follow_up_reuses_the_image_and_keeps_the_conversation(scripted_url, example_image):
    client = Client(scripted_url, verbose=False)
    _ask(client, QUESTION, example_image)
    _, chat, _ = _ask(client, "And which option letter is that?")
    user_images = [m for m in chat if m["role"] == "user" and "file" in m["content"][0]]
    assert len(user_images) == 1  # the follow-up did not need a new upload
    assert [m for m in chat if m["role"] == "user"][-1]["content"][0]["text"] == "And which option letter is that?"
    assert sum("### Answer" in str(_content(m)) for m in chat) == 2


def test_demo_bad_inputs_are_answered_in_the_chat_and_the_app_keeps_serving(scripted_url, example_image, tmp_path):
    client = Client(scripted_url, verbose=False)
    _, chat, _ = _ask(client, "What is in the picture?")
    assert _content(chat[-1]) == [NO_IMAGE] and chat[-1]["metadata"]["title"] == "Error"

    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("plain text, not a PNG")
    _, chat, _ = _ask(client, "What is this?", not_an_image)
    assert chat[-1]["metadata"]["title"] == "Error"
    assert _content(chat[-1])[0].startswith("That file cannot be used as an image:")

    too_large = tmp_path / "huge.png"
    Image.new("RGB", (2300, 2200)).save(too_large)  # 5.06 MP > the test app's 5 MP limit
    _, chat, _ = _ask(client, "What is this?", too_large)
    assert "2300x2200 = 5060000 pixels, more than the limit of 5000000" in _content(chat[-1])[0]

    _, chat, _ = _ask(client, "", example_image)
    assert _content(chat[-1]) == [NO_QUESTION]
    _, chat, _ = _ask(client, QUESTION)  # the image sent with the empty question is kept
    assert _content(chat[-1]) == ["### Answer\n\nC. S QT 911"]


def test_demo_tabs_never_see_each_others_messages_or_crops(scripted_url, example_image, tmp_path):
    inverted = tmp_path / "inverted.png"
    ImageOps.invert(Image.open(example_image).convert("RGB")).save(inverted)
    results: dict[str, list[dict]] = {}

    def tab(name: str, image: Path) -> None:
        results[name] = _ask(Client(scripted_url, verbose=False), f"{QUESTION} ({name})", image)[1]

    threads = [threading.Thread(target=tab, args=args) for args in (("a", example_image), ("b", inverted))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    chat_a, chat_b = results["a"], results["b"]
    assert [m["content"][0]["text"] for m in chat_a if m["role"] == "user" and "text" in m["content"][0]] == [
        f"{QUESTION} (a)"
    ]
    assert [m["content"][0]["text"] for m in chat_b if m["role"] == "user" and "text" in m["content"][0]] == [
        f"{QUESTION} (b)"
    ]
    crop_a = np.asarray(_crop(scripted_url, chat_a), dtype=int)
    crop_b = np.asarray(_crop(scripted_url, chat_b), dtype=int)
    # Each tab's sandbox cropped ITS image: tab b's crop is the negative of tab a's.
    assert np.abs(crop_b - (255 - crop_a)).mean() < 6
    assert np.abs(crop_b - crop_a).mean() > 50


def test_demo_example_is_the_readme_example():
    example = readme_example()
    assert example["text"] == QUESTION and Path(example["files"][0]).name == "17127.jpg"
