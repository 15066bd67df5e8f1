"""`thyme demo` speaks in its own flags: a busy port, the startup line, and a Stop button lit only while a run goes."""

from __future__ import annotations

import queue
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from tests.fixtures.demo_app import free_port
from thyme.cli import main
from thyme.ui.app import build_demo

STARTUP_TIMEOUT_S = 180


def test_demo_busy_port_is_one_line_in_the_demos_terms(capsys) -> None:
    """Gradio's own error says "set server_port in launch()"; the check also comes before any model loads."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["demo", "--port", str(port)]) == 1
    assert capsys.readouterr().err == (
        f"thyme: error: port {port} on 127.0.0.1 is in use (another `thyme demo`?): stop that program or pass "
        f"--port {port + 1}\n"
    )


def _dependencies(demo) -> list[dict]:
    return demo.get_config_file()["dependencies"]


def _fn(demo, index: int):
    fns = demo.fns.values() if isinstance(demo.fns, dict) else demo.fns
    return list(fns)[index].fn


def test_demo_stop_button_is_lit_only_while_a_question_runs() -> None:
    demo = build_demo(lambda config: None)
    config = demo.get_config_file()
    [stop] = [c for c in config["components"] if c.get("props", {}).get("value") == "Stop"]
    assert stop["props"]["interactive"] is False  # idle at start
    deps = _dependencies(demo)
    named = {dep["api_name"]: index for index, dep in enumerate(deps)}
    sets_stop = {
        index: _fn(demo, index)().interactive for index, dep in enumerate(deps) if dep["outputs"] == [stop["id"]]
    }
    after = {deps[index]["trigger_after"]: lit for index, lit in sets_stop.items()}
    assert after[named["add_message"]] is True  # a question was taken: Stop lights before the answer streams
    unlock = next(i for i, dep in enumerate(deps) if dep["trigger_after"] == named["bot_response"])
    assert after[unlock] is False  # the run ended (answered, failed or cancelled)
    assert after[named["stop"]] is False and after[named["clear_conversation"]] is False


@pytest.mark.slow
def test_demo_startup_line_names_our_flags_not_gradios() -> None:
    """Gradio prints "set `share=True` in `launch()`"; the demo has a --share flag and says so."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "thyme.cli", "demo", "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True)
    reader.start()
    seen = []
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline and not any(line.startswith("thyme demo: open") for line in seen):
            try:
                seen.append(lines.get(timeout=1))
            except queue.Empty:
                assert process.poll() is None, "".join(seen)
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    output = "".join(seen)
    assert f"thyme demo: open http://127.0.0.1:{port}/ (Ctrl+C stops it); --share adds a public" in output, output
    assert "share=True" not in output and "launch()" not in output
