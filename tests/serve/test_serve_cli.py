"""`thyme serve` as a user starts it: the real command in its own process, asked through the `openai` client."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.fixtures.demo_app import free_port
from tests.serve.conftest import README_IMAGE, README_SCRIPT, data_url
from thyme.cli import main

README_ANSWER = "C. S QT 911"


@pytest.mark.slow
def test_thyme_serve_scripted_answers_the_openai_client(tmp_path: Path) -> None:
    from openai import OpenAI

    token_file = tmp_path / "token"
    token_file.write_text("cli-token\n")
    port = free_port()
    command = [sys.executable, "-m", "thyme.cli", "serve", "--scripted", str(README_SCRIPT), "--port", str(port),
               "--token-file", str(token_file)]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    root = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.stdout.read()
            try:
                if httpx.get(root + "/healthz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "thyme serve did not start within 120 s"
            time.sleep(0.2)
        client = OpenAI(base_url=root + "/v1", api_key="cli-token", max_retries=0)
        content = [{"type": "image_url", "image_url": {"url": data_url(README_IMAGE)}},
                   {"type": "text", "text": "What is the plate number of the blue car?"}]  # fmt: skip
        completion = client.chat.completions.create(model="thyme", messages=[{"role": "user", "content": content}])
        assert completion.choices[0].message.content == README_ANSWER
        crop = httpx.get(completion.model_extra["thyme"]["images"][0], headers={"Authorization": "Bearer cli-token"})
        assert crop.status_code == 200 and crop.headers["content-type"] == "image/jpeg"
        chunks = list(client.chat.completions.create(model="thyme", messages=[{"role": "user", "content": content}],
                                                     stream=True))  # fmt: skip
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == README_ANSWER
    finally:
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=60)
    assert f"http://127.0.0.1:{port}/v1 as model 'thyme' (token required" in output


def test_serve_flags_are_checked_before_anything_starts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["serve", "--scripted", str(README_SCRIPT)]
    assert main([*argv, "--host", "0.0.0.0"]) == 1
    assert "give a --token-file" in capsys.readouterr().err
    assert main([*argv, "--allow-url-prefix", "https://example.org"]) == 1
    assert "must be an http(s) URL with a path" in capsys.readouterr().err


def test_serve_takes_the_engine_flag_like_answer_and_demo(monkeypatch: pytest.MonkeyPatch) -> None:
    """`thyme serve --model DIR --engine vllm` loads the vLLM engine (not transformers) and lets it batch questions."""
    import argparse

    from thyme.commands import options, serve

    loaded = []
    monkeypatch.setattr(options, "load_model_backend", lambda args: loaded.append(args.engine) or "backend")
    parser = argparse.ArgumentParser(prog="thyme")
    serve.add_parser(parser.add_subparsers())
    for engine, running in (("vllm", serve.SHARED_SERVER_RUNNING), ("transformers", 1)):
        args = parser.parse_args(["serve", "--model", "some/model", "--engine", engine])
        assert options.shared_backend(args) == "backend"
        assert serve.serve_config(args).max_running == running
    assert loaded == ["vllm", "transformers"]
