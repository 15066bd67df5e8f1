"""Fixtures of the `thyme serve` tests: one real sandbox pool, and the app on a loopback port."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import thyme

EXAMPLES = Path(thyme.__file__).parent / "data" / "examples"
README_SCRIPT = EXAMPLES / "readme_17127.json"
README_IMAGE = EXAMPLES / "17127.jpg"
TOKEN = "serve-test-token"


@pytest.fixture(scope="session")
def sandbox():
    from thyme.sandbox import Sandbox

    with Sandbox(timeout=20) as box:
        yield box


def data_url(path: Path) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(path.read_bytes()).decode()


@contextmanager
def running_app(factory, **settings) -> Iterator[str]:
    """Serves ``create_app(factory, ServeConfig(token=TOKEN, **settings))``; yields ``http://127.0.0.1:PORT``."""
    from tests.fixtures.openai_server import serve
    from thyme.config import AgentConfig
    from thyme.serve.app import create_app
    from thyme.serve.config import ServeConfig

    settings.setdefault("token", TOKEN)
    app = create_app(factory, ServeConfig(**settings), AgentConfig(max_attempts=1))
    try:
        with serve(app) as root:
            yield root
    finally:
        app.state.close()
