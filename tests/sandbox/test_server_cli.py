"""`thyme sandbox serve`: the command line refuses unsafe binding and serves the API it documents."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.fixtures.sandbox_server import free_port
from thyme.cli import main
from thyme.sandbox.remote import RemoteSandbox
from thyme.sandbox.server.metrics import WORKER_MODULE

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 60.0


def test_serve_refuses_public_host_without_token(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sandbox", "serve", "--host", "0.0.0.0"]) == 1
    assert capsys.readouterr().err == (
        "thyme: error: refusing to listen on 0.0.0.0 without a token: anyone who can reach it could run code. "
        "Pass --token-file FILE, or listen on 127.0.0.1\n"
    )


def test_serve_refuses_empty_token_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "token").write_text("\n")
    assert main(["sandbox", "serve", "--token-file", str(tmp_path / "token")]) == 1
    assert "is empty: write the token on its first line" in capsys.readouterr().err


def test_serve_command_runs_the_readme_example(tmp_path: Path, example: dict) -> None:
    port = free_port()
    (tmp_path / "token").write_text("cli-token\n")
    command = [sys.executable, "-m", "thyme.cli", "sandbox", "serve", "--port", str(port), "--workers", "1",
               "--token-file", str(tmp_path / "token")]  # fmt: skip
    server = subprocess.Popen(command, cwd=REPO, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                httpx.get(f"{url}/healthz")
                break
            except httpx.TransportError:
                assert server.poll() is None and time.monotonic() < deadline, "thyme sandbox serve did not start"
                time.sleep(0.2)
        with RemoteSandbox(url, token="cli-token") as sb:
            session = sb.session(image=str(example["image"]), item_id="17127")
            result = session.run(example["code"])
            assert result.ok and len(result.images) == 1
            children = psutil.Process(server.pid).children()  # workers, and the image-header checker
            workers = [child for child in children if WORKER_MODULE in child.cmdline()]
            assert sb.health()["workers_alive"] == len(workers) >= 1
    finally:
        server.terminate()  # uvicorn shuts down gracefully on SIGTERM, then re-raises it (exit status -15)
        _, stderr = server.communicate(timeout=30)
    assert f"thyme sandbox server on http://127.0.0.1:{port} (bearer token required)" in stderr
    assert server.returncode == -15
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, "the server left sandbox workers or checkers running after shutdown"
