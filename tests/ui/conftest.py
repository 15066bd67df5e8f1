"""Fixtures of the demo tests: the scripted README demo served on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.demo_app import serving
from thyme.config import AgentConfig
from thyme.sandbox import Sandbox
from thyme.ui.app import README_SCRIPT, build_demo, readme_example, scripted_agent_factory, scripted_description

# Small enough that a test can make a "too large" image cheaply (a blank 2300x2200 PNG), large enough for 17127.jpg.
TEST_MAX_INPUT_PIXELS = 5_000_000


@pytest.fixture(scope="module")
def ui_sandbox() -> Iterator[Sandbox]:
    with Sandbox(timeout=10) as sandbox:
        yield sandbox


@pytest.fixture(scope="module")
def scripted_url(ui_sandbox: Sandbox) -> Iterator[str]:
    """The demo as ``thyme demo`` starts it with no flag: replaying the README example, served on 127.0.0.1."""
    demo = build_demo(
        scripted_agent_factory(README_SCRIPT, ui_sandbox),
        base_config=AgentConfig(max_input_pixels=TEST_MAX_INPUT_PIXELS),
        examples=[readme_example()],
        description=scripted_description(README_SCRIPT),
        concurrency_limit=4,  # tabs really run at the same time (the two-tab test)
    )
    with serving(demo) as url:
        yield url


@pytest.fixture
def example_image() -> Path:
    return Path(readme_example()["files"][0])
