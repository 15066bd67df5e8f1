"""The demo page in a real headless Chromium (driven by Playwright): what a user sees after a scripted conversation.

Skips, saying why, where Chromium or Playwright is missing. ``THYME_DEMO_SCREENSHOT=docs/demo.png`` also writes the
screenshot there (that is how docs/demo.png is made).
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.demo_app import serving
from thyme.agent import ThymeAgent
from thyme.backends.scripted import ScriptedBackend, load_script
from thyme.ui.app import README_SCRIPT, build_demo

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="Playwright is not installed (pip install -e '.[dev]'): browser check skipped"
)

pytestmark = pytest.mark.slow

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
# --no-sandbox: Chromium refuses to run as root with its own sandbox (CI containers run as root).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking"]
SCREENSHOT_ENV = "THYME_DEMO_SCREENSHOT"
TIMEOUT_MS = 60_000
EXAMPLE_QUESTION = json.loads(README_SCRIPT.read_text(encoding="utf-8"))["question"]


@pytest.fixture(scope="module")
def page() -> Iterator[sync_api.Page]:
    executable = next((path for path in map(shutil.which, CHROMIUM_NAMES) if path), None)
    if executable is None:
        pytest.skip("Chromium is not installed (apt-get install chromium): the demo's browser check did not run")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1500})
        page.set_default_timeout(TIMEOUT_MS)
        yield page
        browser.close()


def _ask(page: sync_api.Page, url: str, image: Path, question: str) -> None:
    page.goto(url)
    page.locator("input[type=file]").first.set_input_files(str(image))
    page.locator("textarea").first.fill(question)
    page.keyboard.press("Enter")


def test_browser_page_shows_code_crop_and_answer(page, scripted_url, example_image, tmp_path):
    _ask(page, scripted_url, example_image, "What is the plate number of the blue car?")
    answer = page.locator(".message.bot", has=page.locator("h3", has_text="Answer"))
    sync_api.expect(answer).to_contain_text("C. S QT 911")
    sync_api.expect(page.locator("textarea").first).to_be_enabled()  # the input is unlocked after the run

    # The code block is highlighted Python, inside a titled (collapsible) message.
    code = page.locator(".message.bot pre code.language-python")
    sync_api.expect(code).to_contain_text("cv2.imread(image_path)")
    assert code.locator(".token.keyword").count() > 0
    sync_api.expect(page.get_by_text("Python code (step 1)")).to_be_visible()
    # The crop came back into the page as a loaded image of the crop's size (220x128).
    crop = page.locator(".message.bot img[src*='17127_']")
    sync_api.expect(crop).to_have_count(1)
    assert crop.evaluate("img => [img.complete, img.naturalWidth, img.naturalHeight]") == [True, 220, 128]

    shot = tmp_path / "demo.png"
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 20_000  # a rendered page, not a blank one
    if os.environ.get(SCREENSHOT_ENV):
        shutil.copyfile(shot, os.environ[SCREENSHOT_ENV])


def test_browser_example_fills_the_input_with_the_readme_photo_and_question(page, scripted_url):
    page.goto(scripted_url)
    page.locator("textarea").first.fill("What is in the picture?")
    page.keyboard.press("Enter")
    sync_api.expect(page.get_by_text("No image yet: upload or paste an image")).to_be_visible()  # not folded away
    sync_api.expect(page.locator("textarea").first).to_be_enabled()
    page.get_by_text("Question: What is the plate number of the blue car").click()
    sync_api.expect(page.locator("textarea").first).to_have_value(EXAMPLE_QUESTION)
    sync_api.expect(page.locator("img[src*='17127.jpg']").first).to_be_visible()  # the photo is attached


class _BlockedBackend(ScriptedBackend):
    """Replays the README example but holds the second call until released: a run that is still going."""

    def __init__(self, release: threading.Event):
        super().__init__(load_script(README_SCRIPT))
        self._release = release

    def generate(self, messages, *, stop, sampling):
        if self.calls:
            self._release.wait(timeout=TIMEOUT_MS / 1000)
        return super().generate(messages, stop=stop, sampling=sampling)


def test_browser_stop_button_cancels_the_run_and_unlocks_the_input(page, ui_sandbox, example_image):
    release = threading.Event()
    demo = build_demo(lambda config: ThymeAgent(_BlockedBackend(release), config, sandbox=ui_sandbox))
    try:
        with serving(demo) as url:
            page.goto(url)
            sync_api.expect(page.get_by_role("button", name="Stop", exact=True)).to_be_disabled()  # nothing runs yet
            _ask(page, url, example_image, "What is the plate number of the blue car?")
            sync_api.expect(page.get_by_text("Sandbox result (step 1)")).to_be_visible()  # mid-run
            sync_api.expect(page.get_by_role("button", name="Stop", exact=True)).to_be_enabled()
            sync_api.expect(page.locator("textarea").first).to_be_disabled()
            page.get_by_role("button", name="Stop").click()
            sync_api.expect(page.locator("textarea").first).to_be_enabled()
            sync_api.expect(page.get_by_text("You stopped this run")).to_be_visible()
            sync_api.expect(page.get_by_role("button", name="Stop", exact=True)).to_be_disabled()  # idle again
            sync_api.expect(page.get_by_text("The model is writing")).to_have_count(0)  # no spinner left behind
            release.set()
            page.wait_for_timeout(1000)  # had the run gone on, its answer would now be on the page
            assert page.locator(".message.bot h3", has_text="Answer").count() == 0
            sync_api.expect(page.get_by_text("Sandbox result (step 1)")).to_be_visible()  # the partial run stays
    finally:
        release.set()
