"""``thyme demo``: flags, startup errors as one line, and the real command serving the scripted example."""

from __future__ import annotations

import subprocess
import sys
import time

import httpx
import pytest

from tests.fixtures.demo_app import free_port
from thyme.cli import build_parser, main

STARTUP_TIMEOUT_S = 120


def test_cli_demo_defaults_to_the_scripted_readme_example_on_localhost():
    args = build_parser().parse_args(["demo"])
    assert (args.model, args.endpoint, args.scripted) == (None, None, None)
    assert (args.host, args.port, args.share) == ("127.0.0.1", 7860, False)


def test_cli_demo_model_flags_are_exclusive(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--model", "m", "--endpoint", "http://127.0.0.1:1/v1"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_cli_demo_model_name_without_endpoint_is_one_line_error(capsys):
    assert main(["demo", "--model-name", "thyme"]) == 1
    assert capsys.readouterr().err == "thyme: error: --model-name only applies with --endpoint\n"


def test_cli_demo_missing_model_directory_says_how_to_get_weights(capsys, tmp_path):
    assert main(["demo", "--model", str(tmp_path / "Thyme-RL")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"thyme: error: model path {tmp_path / 'Thyme-RL'} does not exist")
    assert "thyme tiny-model" in err and err.count("\n") == 1


def test_cli_demo_unreadable_script_is_one_line_error(capsys, tmp_path):
    script = tmp_path / "script.json"
    script.write_text("{not json")
    assert main(["demo", "--scripted", str(script)]) == 1
    assert capsys.readouterr().err.startswith(f"thyme: error: cannot read script {script}")


def test_cli_demo_registration_does_not_import_gradio():
    code = (
        "import sys, thyme.ui\n"
        "from thyme.cli import build_parser\n"
        "build_parser().parse_args(['demo'])\n"
        "assert 'gradio' not in sys.modules, 'thyme --help must not pay for importing gradio'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.slow
def test_cli_demo_command_serves_the_scripted_demo():
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "thyme.cli", "demo", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            assert process.poll() is None, process.stdout.read()
            try:
                config = httpx.get(f"http://127.0.0.1:{port}/config", timeout=5)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "thyme demo did not start serving"
                time.sleep(0.5)
        assert config.status_code == 200
        assert "Scripted replay" in config.text and "readme_17127.json" in config.text
        info = httpx.get(f"http://127.0.0.1:{port}/gradio_api/info", timeout=5).json()
        assert {"/add_message", "/bot_response"} <= set(info["named_endpoints"])
    finally:
        process.terminate()
        process.wait(timeout=30)
