"""The HTTP sandbox server through a real server on 127.0.0.1: the remote pool behaves as the local one."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
from PIL import Image

from tests.fixtures.sandbox_server import running_server
from thyme.sandbox import ExecutionResult, InvalidInput, Sandbox, SandboxClosed
from thyme.sandbox.remote import RemoteSandbox
from thyme.sandbox.server.errors import RequestRejected, SessionNotFound, Unauthorized

TOKEN = "test-token-7f3a"
RUN_TIMEOUT_S = 6.0
MAX_REQUEST_MB = 1.0
MAX_PIXELS = 5_000_000  # the README image (2496x1392 = 3.5 MP) fits, a 3000x3000 one does not


@pytest.fixture(scope="module")
def allowed_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("allowed")


@pytest.fixture(scope="module")
def server_url(allowed_root: Path) -> Iterator[str]:
    with running_server(token=TOKEN, workers=2, timeout_s=RUN_TIMEOUT_S, max_request_mb=MAX_REQUEST_MB,
                        max_pixels=MAX_PIXELS, allowed_roots=[allowed_root]) as url:  # fmt: skip
        yield url


@pytest.fixture
def remote(server_url: str) -> Iterator[RemoteSandbox]:
    with Sandbox(url=server_url, token=TOKEN) as sb:
        yield sb


def _same_pixels(path_a: str | Path, path_b: str | Path) -> bool:
    a, b = cv2.imread(str(path_a)), cv2.imread(str(path_b))
    return a is not None and b is not None and a.shape == b.shape and bool(np.array_equal(a, b))


def test_sandbox_with_url_returns_remote_sandbox(server_url: str) -> None:
    with Sandbox(url=server_url, token=TOKEN) as sb:
        assert isinstance(sb, RemoteSandbox)


def test_remote_readme_example_crop_is_pixel_identical(remote: RemoteSandbox, example: dict) -> None:
    session = remote.session(image=str(example["image"]), item_id="17127")
    result = session.run(example["code"])
    assert isinstance(result, ExecutionResult)
    assert result.ok, result.error
    assert len(result.images) == 1
    local = Path(result.images[0])
    assert local.parent == session.scratch_dir and local.name.startswith("17127_")
    assert _same_pixels(local, example["crop"])
    assert result.stdout.strip() == str(local)  # the server's scratch path is rewritten to the local copy
    assert any("clamped to (1250, 1030, 1360, 1094)" in note for note in result.repairs)
    session.close()
    assert not session.scratch_dir.exists()


def test_remote_session_keeps_variables_and_reports_code_errors(remote: RemoteSandbox, example: dict) -> None:
    with remote.session(image=str(example["image"]), item_id="item-9") as session:
        assert session.run("width = 7").ok
        assert session.run("print(width * 6)").stdout == "42\n"
        failed = session.run("print(undefined_name)")
    assert not failed.ok
    assert failed.error is not None and failed.error.startswith("Sandbox for item-9:")
    assert "undefined_name" in failed.error


def test_remote_one_shot_run_cleans_up_like_a_local_one(remote: RemoteSandbox, example: dict) -> None:
    result = remote.run(example["code"], image=str(example["image"]), item_id="17127")
    assert result.ok and len(result.images) == 1 and Path(result.images[0]).name.startswith("17127_")
    assert not Path(result.images[0]).parent.exists()  # deleted with the session, as Sandbox.run does
    assert remote.health()["sessions_open"] == 0


def test_closed_remote_session_refuses_runs(remote: RemoteSandbox, example: dict) -> None:
    session = remote.session(image=str(example["image"]))
    session_id = session.session_id
    session.close()
    with pytest.raises(SandboxClosed, match="closed"):
        session.run("print(1)")
    with pytest.raises(SessionNotFound, match=f"session '{session_id}' does not exist"):
        remote.request("POST", f"/v1/sessions/{session_id}/run", json={"code": "print(1)"})


def test_server_refuses_missing_and_wrong_token(server_url: str, example: dict) -> None:
    no_token = httpx.post(f"{server_url}/v1/sessions", files={"images": ("a.jpg", b"x")})
    assert no_token.status_code == 401
    assert no_token.headers["www-authenticate"] == "Bearer"
    assert no_token.json()["error"] == {
        "kind": "unauthorized", "message": "this server needs a bearer token: send 'Authorization: Bearer <token>'",
    }  # fmt: skip
    with RemoteSandbox(server_url, token="wrong") as sb, pytest.raises(Unauthorized, match="wrong bearer token"):
        sb.session(image=str(example["image"]))
    with RemoteSandbox(server_url) as sb, pytest.raises(Unauthorized):
        sb.metrics()
    assert httpx.get(f"{server_url}/healthz").json()["status"] == "ok"  # liveness needs no token


def test_server_refuses_oversized_upload_with_clear_message(remote: RemoteSandbox, tmp_path: Path) -> None:
    big = tmp_path / "noise.png"
    pixels = np.random.default_rng(0).integers(0, 256, (800, 800, 3), dtype=np.uint8)  # ~1.9 MB as PNG
    Image.fromarray(pixels).save(big)
    with pytest.raises(RequestRejected, match=r"accepts at most 1,048,576 bytes \(1 MB\)") as refused:
        remote.session(image=str(big))
    assert refused.value.kind == "request_too_large" and refused.value.status == 413
    assert isinstance(refused.value, InvalidInput)


def _streamed_upload(chunks: int) -> Iterator[bytes]:
    yield b'--xyz\r\nContent-Disposition: form-data; name="images"; filename="a.png"\r\n\r\n'
    for _ in range(chunks):
        yield b"0" * 65536
    yield b"\r\n--xyz--\r\n"


def test_server_refuses_oversized_streamed_body(server_url: str) -> None:
    # A generator body goes out chunked, with no Content-Length: the server must count it as it arrives.
    answer = httpx.post(f"{server_url}/v1/sessions", content=_streamed_upload(40),
                        headers={"Authorization": f"Bearer {TOKEN}",
                                 "Content-Type": "multipart/form-data; boundary=xyz"})  # fmt: skip
    assert answer.status_code == 413
    assert answer.json()["error"]["kind"] == "request_too_large"


def test_server_refuses_too_big_image(remote: RemoteSandbox, tmp_path: Path) -> None:
    huge = tmp_path / "huge.png"
    Image.new("L", (3000, 3000)).save(huge)  # 9 MP but a few KB: passes the size limit, not the pixel limit
    with pytest.raises(RequestRejected, match=r"'huge.png' is 3000x3000 = 9,000,000 pixels; the server accepts "
                                              r"at most 5,000,000") as refused:  # fmt: skip
        remote.session(image=str(huge))
    assert refused.value.kind == "image_too_large"


def test_server_refuses_file_that_is_not_an_image(remote: RemoteSandbox, tmp_path: Path) -> None:
    fake = tmp_path / "notes.jpg"
    fake.write_text("not an image")
    with pytest.raises(RequestRejected, match="'notes.jpg' is not an image PIL can read") as refused:
        remote.session(image=str(fake))
    assert refused.value.status == 422


def test_server_paths_only_under_allowed_roots(server_url: str, allowed_root: Path, example: dict) -> None:
    inside = allowed_root / "17127.jpg"
    shutil.copyfile(example["image"], inside)
    link = allowed_root / "escape.jpg"
    link.symlink_to(example["crop"])  # a link inside the root pointing outside it
    with RemoteSandbox(server_url, token=TOKEN, server_paths=True) as sb:
        result = sb.session(image=str(inside), item_id="17127").run(example["code"])
        assert result.ok and _same_pixels(result.images[0], example["crop"])
        for outside in (example["crop"], link):
            with pytest.raises(RequestRejected, match="is outside the allowed roots") as refused:
                sb.session(image=str(outside))
            assert refused.value.status == 403
    assert inside.read_bytes() == Path(example["image"]).read_bytes()


def test_endless_loop_in_one_session_does_not_block_another(remote: RemoteSandbox, example: dict) -> None:
    looping = remote.session(image=str(example["image"]), item_id="loop")
    results: dict[str, ExecutionResult] = {}
    thread = threading.Thread(target=lambda: results.update(loop=looping.run("while True:\n    pass")))
    thread.start()
    try:
        with remote.session(image=str(example["image"]), item_id="17127") as other:
            assert other.run(example["code"]).ok
            assert thread.is_alive(), "the other session had to wait for the endless loop to be killed"
    finally:
        thread.join(timeout=RUN_TIMEOUT_S * 10)
    assert results["loop"].error == f"Sandbox for loop: Execution timed out after {RUN_TIMEOUT_S:g} seconds."
    assert looping.run("print('alive again')").stdout == "alive again\n"


def test_fetching_unknown_image_is_a_clear_404(remote: RemoteSandbox, example: dict) -> None:
    with remote.session(image=str(example["image"])) as session:
        with pytest.raises(RequestRejected, match="has no image 'secret.png'") as refused:
            remote.request("GET", f"/v1/sessions/{session.session_id}/images/secret.png")
    assert refused.value.status == 404


def test_metrics_report_runs_errors_latency_and_workers(remote: RemoteSandbox, example: dict) -> None:
    with remote.session(image=str(example["image"])) as session:
        session.run("print(1)")
        session.run("1/0")
    metrics = remote.metrics()
    assert metrics["runs"] >= 2
    assert metrics["errors"]["code_error"] >= 1
    assert metrics["latency_ms"]["p50"] is not None and metrics["latency_ms"]["p99"] >= metrics["latency_ms"]["p50"]
    assert metrics["workers_alive"] >= 1 and metrics["queue_length"] == 0
    assert metrics["rss_bytes"] > 0


def test_openapi_schema_documents_the_api(server_url: str) -> None:
    schema = httpx.get(f"{server_url}/openapi.json").json()
    assert {"/v1/sessions", "/v1/sessions/{session_id}/run", "/v1/sessions/{session_id}/images/{name}",
            "/v1/sessions/{session_id}", "/healthz", "/metrics"} <= set(schema["paths"])  # fmt: skip
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
