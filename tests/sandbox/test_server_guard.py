"""The tool server on loopback without a token, attacked as a web page in the user's browser and as a slow client:
DNS rebinding, cross-origin and simple cross-site posts, half-sent requests, upload bombs, swapped image files."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.fixtures.sandbox_server import running_server
from tests.sandbox.bomb_files import ico_wrapping_huge_png, png_of_empty_chunks
from thyme.sandbox.remote import RemoteSandbox
from thyme.sandbox.returned import open_returned_image
from thyme.sandbox.server.guard import CLIENT_HEADER, allowed_host_names, host_name, refusal

REQUEST_TIMEOUT_S = 1.5


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with running_server(workers=1, request_timeout_s=REQUEST_TIMEOUT_S, max_request_mb=64) as base:
        yield base


def _open_session(url: str, image: Path, **headers: str) -> httpx.Response:
    with image.open("rb") as file:
        return httpx.post(f"{url}/v1/sessions", files={"images": (image.name, file)}, headers=headers, timeout=60)


def _sessions_open(url: str) -> int:
    return int(httpx.get(f"{url}/healthz").json()["sessions_open"])


def _scope(host: str, method: str = "GET", **headers: str) -> dict:
    pairs = [(b"host", host.encode())] + [
        (k.lower().replace("_", "-").encode(), v.encode()) for k, v in headers.items()
    ]
    return {"type": "http", "scheme": "http", "method": method, "headers": pairs}


def test_guard_rules_in_isolation() -> None:
    loopback = allowed_host_names("127.0.0.1")
    assert host_name("[::1]:8765") == "::1" and host_name("Example.ORG") == "example.org"
    assert refusal(_scope("localhost:9999"), loopback) is None  # any port: SSH tunnels keep working
    assert refusal(_scope("evil.example:8765"), loopback)[:2] == (421, "host_not_allowed")
    assert refusal(_scope("127.0.0.1:1", origin="http://evil.example"), loopback)[:2] == (403, "origin_not_allowed")
    assert refusal(_scope("127.0.0.1:1", origin="null"), loopback)[1] == "origin_not_allowed"
    assert refusal(_scope("127.0.0.1:1", origin="http://127.0.0.1:1"), loopback) is None  # same origin
    form = _scope("127.0.0.1:1", "POST", content_type="multipart/form-data; boundary=x")
    assert refusal(form, loopback)[:2] == (403, "cross_site_request")
    assert refusal(form, loopback, client_header_required=False) is None  # a token server: Authorization does it
    assert refusal(_scope("127.0.0.1:1", "POST", content_type="Application/JSON; charset=utf-8"), loopback) is None
    marked = _scope("127.0.0.1:1", "POST", content_type="multipart/form-data", **{CLIENT_HEADER: "1"})
    assert refusal(marked, loopback) is None
    assert allowed_host_names("0.0.0.0") is None and allowed_host_names("0.0.0.0", ["box"]) == {"box"}
    assert "box" in allowed_host_names("127.0.0.1", ["Box"])


def test_dns_rebinding_page_cannot_open_a_session(url: str, small_image: Path) -> None:
    port = url.rsplit(":", 1)[1]
    refused = _open_session(url, small_image, Host=f"evil.example:{port}", **{CLIENT_HEADER: "1"})
    assert refused.status_code == 421
    assert refused.json()["error"]["kind"] == "host_not_allowed"
    assert "--allow-host" in refused.json()["error"]["message"]
    assert _sessions_open(url) == 0


def test_cross_origin_and_simple_cross_site_posts_are_refused(url: str, small_image: Path) -> None:
    cross = _open_session(url, small_image, Origin="http://evil.example", **{CLIENT_HEADER: "1"})
    assert cross.status_code == 403 and cross.json()["error"]["kind"] == "origin_not_allowed"
    form = _open_session(url, small_image)  # what an HTML form can send: multipart, no custom header
    assert form.status_code == 403 and cross.json()["error"]["kind"] != form.json()["error"]["kind"]
    assert f"'{CLIENT_HEADER}: 1'" in form.json()["error"]["message"]
    text_post = httpx.post(f"{url}/v1/sessions/x/run", content='{"code": "print(1)"}',
                           headers={"Content-Type": "text/plain"})  # fmt: skip
    assert text_post.status_code == 403
    assert _sessions_open(url) == 0
    opened = _open_session(url, small_image, **{CLIENT_HEADER: "1"})  # a program: allowed
    assert opened.status_code == 201
    httpx.delete(f"{url}/v1/sessions/{opened.json()['session_id']}", headers={CLIENT_HEADER: "1"})


def _closed_within(sock: socket.socket, limit_s: float) -> float:
    """Seconds until the server closes ``sock`` (reading and dropping any answer), or fails past ``limit_s``."""
    started = time.monotonic()
    sock.settimeout(limit_s)
    while sock.recv(65536):
        pass
    return time.monotonic() - started


@pytest.mark.parametrize("half", [
    b"POST /v1/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: appl",  # headers never finish
    b"POST /v1/sessions/x/run HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    b"Content-Length: 1000\r\n\r\n{\"code\": \"pri",  # the body never finishes
])  # fmt: skip
def test_half_sent_request_is_dropped(url: str, half: bytes) -> None:
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(half)
        waited = _closed_within(sock, 30)  # socket.timeout here would mean the server kept it open
    assert waited >= REQUEST_TIMEOUT_S * 0.5


def test_half_sent_second_request_on_a_kept_alive_connection_is_dropped(url: str) -> None:
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        answer = b""
        while b'"status":"ok"' not in answer:
            answer += sock.recv(65536)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-")
        _closed_within(sock, 30)


def test_a_run_longer_than_the_request_deadline_still_answers(url: str, small_image: Path) -> None:
    with RemoteSandbox(url) as sb, sb.session(image=str(small_image)) as session:
        result = session.run(f"import time\ntime.sleep({REQUEST_TIMEOUT_S * 2})\nprint('slept')")
    assert result.ok and result.stdout == "slept\n"


@pytest.mark.parametrize(("build", "expected"), [
    (png_of_empty_chunks, "could not be read within"),
    (ico_wrapping_huge_png, "not a PNG, JPEG, BMP, GIF, TIFF or WebP file"),
])  # fmt: skip
def test_upload_bomb_is_refused_without_costing_the_server_memory(url: str, tmp_path: Path, build,
                                                                 expected: str) -> None:  # fmt: skip
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(build())
    with RemoteSandbox(url) as sb:
        before = sb.metrics()["rss_bytes"]
        refused = _open_session(url, bomb, **{CLIENT_HEADER: "1"})
        after = sb.metrics()["rss_bytes"]
    assert refused.status_code == 422 and refused.json()["error"]["kind"] == "not_an_image"
    assert expected in refused.json()["error"]["message"]
    assert after - before < 64 * 2**20, (before, after)  # the upload itself is written to disk in chunks


def test_image_endpoint_never_serves_through_a_link(url: str, small_image: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"TOP-SECRET")
    secret.chmod(0o600)
    code = ("import cv2\ncv2.imwrite('/mnt/data/temp_processed_images/s.png', cv2.imread(image_path))\n"
            "print('/mnt/data/temp_processed_images/s.png')")  # fmt: skip
    with RemoteSandbox(url) as sb, sb.session(image=str(small_image)) as session:
        answer = sb.request("POST", f"/v1/sessions/{session.session_id}/run", json={"code": code}).json()
        served = Path(answer["images"][0]["path"])  # the checked copy on the server (this machine)
        assert sb.request("GET", answer["images"][0]["url"]).content == served.read_bytes()
        served.unlink()
        served.symlink_to(secret)
        gone = httpx.get(url + answer["images"][0]["url"])
    assert gone.status_code == 404 and b"TOP-SECRET" not in gone.content


def test_open_returned_image_refuses_links_fifos_and_hard_links(tmp_path: Path) -> None:
    plain = tmp_path / "plain.png"
    plain.write_bytes(b"x" * 10)
    opened = open_returned_image(plain)
    assert opened is not None and opened[1] == 10
    opened[0].close()
    (tmp_path / "link.png").symlink_to(plain)
    os.mkfifo(tmp_path / "fifo.png")
    hard = tmp_path / "target.png"
    hard.write_bytes(b"y")
    os.link(hard, tmp_path / "hard.png")
    for name in ("link.png", "fifo.png", "hard.png", "missing.png"):
        assert open_returned_image(tmp_path / name) is None, name
