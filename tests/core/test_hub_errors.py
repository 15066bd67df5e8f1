"""A hub id that cannot be loaded fails at once with its real cause (no network, unknown id, gated) and one hint.

Before, transformers' downloads retried a refused connection with backoff: about 20 warnings and half a minute
offline, then "model not found" and a hint to `huggingface-cli`, which huggingface-hub 2.x no longer installs.
A local HTTP server stands in for the hub; a closed port stands in for "no network".
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from thyme.errors import ModelNotFoundError

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_IMAGE = REPO_ROOT / "thyme" / "data" / "examples" / "17127.jpg"


class _FakeHub(BaseHTTPRequestHandler):
    """Answers model-info requests as the hub does for an unknown and for a gated repository; counts requests."""

    requests: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        type(self).requests.append(self.path)
        code, error = (403, "GatedRepo") if "/gated-org/" in self.path else (404, "RepoNotFound")
        body = b'{"error": "no"}'
        self.send_response(code)
        self.send_header("X-Error-Code", error)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_HEAD = do_GET

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    from huggingface_hub import constants

    _FakeHub.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    yield _FakeHub
    server.shutdown()
    server.server_close()


def _model_requests(hub: type[_FakeHub]) -> list[str]:
    """Requests about models (huggingface-hub also asks the endpoint other things, e.g. on first use)."""
    return [path for path in hub.requests if path.startswith("/api/models/")]


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_hub_unknown_id_says_not_found_after_one_request(fake_hub) -> None:
    from thyme.backends.local import TransformersBackend

    with pytest.raises(ModelNotFoundError) as info:
        TransformersBackend.from_pretrained("nobody-org/no-such-thyme")
    message = str(info.value)
    assert "the hub has no model nobody-org/no-such-thyme" in message
    assert "check the id" in message
    assert _model_requests(fake_hub) == ["/api/models/nobody-org/no-such-thyme"]  # one request, no retry storm


def test_hub_gated_model_says_gated_and_how_to_get_access(fake_hub) -> None:
    from thyme.backends.local import TransformersBackend

    with pytest.raises(ModelNotFoundError) as info:
        TransformersBackend.from_pretrained("gated-org/thyme")
    assert "gated-org/thyme is a gated model" in str(info.value)
    assert "hf auth login" in str(info.value)
    assert len(_model_requests(fake_hub)) == 1


def test_hub_offline_mode_says_not_cached(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from huggingface_hub import constants

    from thyme.backends.local import TransformersBackend

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="not in the local hub cache and HF_HUB_OFFLINE is set"):
        TransformersBackend.from_pretrained("Kwai-Keye/Thyme-RL")


@pytest.mark.slow
def test_hub_answer_without_network_fails_with_one_line_and_the_hf_hint(tmp_path: Path) -> None:
    """The user's view: `thyme answer ... --model Kwai-Keye/Thyme-RL` with no network, real CLI, real hub client."""
    env = {key: value for key, value in os.environ.items() if not key.endswith("_OFFLINE")}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{_closed_port()}", HF_HOME=str(tmp_path / "hf"))
    done = subprocess.run(
        [sys.executable, "-m", "thyme.cli", "answer", str(EXAMPLE_IMAGE), "What is it?", "--model",
         "Kwai-Keye/Thyme-RL"],
        capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=300,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr  # no retry warnings
    assert lines[0].startswith("thyme: error: cannot reach the hub at http://127.0.0.1:")
    assert "hf download Kwai-Keye/Thyme-RL --local-dir DIR" in lines[0]
    assert "huggingface-cli" not in done.stderr
