"""Server limits that need their own server: session slots and the busy answer, idle expiry, safe binding."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from tests.fixtures.sandbox_server import running_server
from thyme.sandbox import InvalidInput
from thyme.sandbox.remote import RemoteSandbox
from thyme.sandbox.server.config import ServerConfig, is_loopback_host, read_token_file
from thyme.sandbox.server.errors import ServerBusy, SessionNotFound

WAIT_S = 0.5


def test_full_server_answers_busy_instead_of_hanging(example: dict) -> None:
    with running_server(workers=1, max_sessions=1, max_queue=1, queue_wait_s=WAIT_S) as url, RemoteSandbox(url) as sb:
        first = sb.session(image=str(example["image"]))
        with pytest.raises(ServerBusy, match=r"all 1 sessions are in use and none came free within 0.5 s") as busy:
            sb.session(image=str(example["image"]))
        assert busy.value.status == 503
        assert sb.metrics()["errors"]["busy"] == 1
        first.close()
        second = sb.session(image=str(example["image"]))  # the freed slot is usable again
        assert second.run("print(2)").stdout == "2\n"


def test_queued_request_gets_the_slot_freed_while_it_waits(example: dict) -> None:
    with running_server(workers=1, max_sessions=1, max_queue=1, queue_wait_s=60) as url, RemoteSandbox(url) as sb:
        first = sb.session(image=str(example["image"]))
        opened: list[object] = []
        waiter = threading.Thread(target=lambda: opened.append(sb.session(image=str(example["image"]))))
        waiter.start()
        deadline = time.monotonic() + 30
        while sb.metrics()["queue_length"] != 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sb.metrics()["queue_length"] == 1
        with pytest.raises(ServerBusy, match="1 requests are already waiting"):  # the queue is full: no wait
            sb.session(image=str(example["image"]))
        first.close()
        waiter.join(timeout=60)
        assert len(opened) == 1 and sb.metrics()["queue_length"] == 0


def test_idle_session_expires_and_frees_its_slot(example: dict) -> None:
    # 3 s: long enough that the fresh session below is not reaped between its open and its run on a busy machine.
    with running_server(workers=1, max_sessions=1, idle_timeout_s=3) as url, RemoteSandbox(url) as sb:
        session = sb.session(image=str(example["image"]))
        deadline = time.monotonic() + 30
        while sb.health()["sessions_open"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert sb.health()["sessions_open"] == 0
        with pytest.raises(SessionNotFound, match=r"it expired after 3 s idle. Open a new session"):
            session.run("print(1)")
        assert sb.session(image=str(example["image"])).run("print(3)").stdout == "3\n"


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "example.org"])
def test_config_refuses_non_loopback_host_without_token(host: str) -> None:
    with pytest.raises(InvalidInput, match=f"refusing to listen on {host} without a token"):
        ServerConfig(host=host)
    assert ServerConfig(host=host, token="secret").host == host


@pytest.mark.parametrize(("host", "loopback"), [("127.0.0.1", True), ("127.5.0.1", True), ("::1", True),
                                                ("localhost", True), ("0.0.0.0", False), ("192.168.1.2", False)])
def test_is_loopback_host(host: str, loopback: bool) -> None:
    assert is_loopback_host(host) is loopback


def test_config_validates_limits_and_roots(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="max_pixels must be positive, got 0"):
        ServerConfig(max_pixels=0)
    with pytest.raises(InvalidInput, match="is not a folder"):
        ServerConfig(allowed_roots=[tmp_path / "missing"])
    assert ServerConfig(workers=3).max_sessions == 12


def test_read_token_file(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("  s3cret \nsecond line\n")
    assert read_token_file(token_file) == "s3cret"
    token_file.write_text("\n")
    with pytest.raises(InvalidInput, match="is empty"):
        read_token_file(token_file)
    with pytest.raises(InvalidInput, match="cannot read the token file"):
        read_token_file(tmp_path / "absent")


def test_import_sandbox_needs_no_server_packages() -> None:
    import subprocess
    import sys

    probe = "import sys, thyme.sandbox; print(sorted({m.split('.')[0] for m in sys.modules} & {'fastapi', " \
            "'uvicorn', 'mcp', 'httpx', 'starlette', 'psutil'}))"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout == "[]\n"
