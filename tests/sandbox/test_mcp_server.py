"""The MCP server through the SDK's own client over stdio, started as `thyme sandbox mcp` in a subprocess."""

from __future__ import annotations

import asyncio
import base64
import shutil
import sys
from pathlib import Path

import cv2
import numpy as np
from mcp import Client, StdioServerParameters
from mcp.types import ImageContent, TextContent

REPO = Path(__file__).resolve().parents[2]
CALL_TIMEOUT_S = 120.0


def _server(allowed_root: Path) -> StdioServerParameters:
    return StdioServerParameters(
        command=sys.executable,
        args=["-m", "thyme.cli", "sandbox", "mcp", "--allow-root", str(allowed_root), "--workers", "1",
              "--timeout-s", "20"],
        cwd=str(REPO),
    )  # fmt: skip


def _decode(content: ImageContent) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(base64.b64decode(content.data), np.uint8), cv2.IMREAD_COLOR)


async def _conversation(allowed_root: Path, image: Path, code: str) -> dict[str, object]:
    """Lists the tools, loads the image, runs the README code and a failing block, refuses an outside path."""
    seen: dict[str, object] = {}
    async with Client(_server(allowed_root), read_timeout_seconds=CALL_TIMEOUT_S) as client:
        seen["tools"] = sorted(tool.name for tool in (await client.list_tools()).tools)
        loaded = await client.call_tool("load_image", {"path": str(image)})
        seen["loaded"] = loaded
        text = loaded.content[0].text  # type: ignore[union-attr]
        session_id = text.split("session_id: ")[1].split("\n")[0]
        seen["run"] = await client.call_tool("run_python", {"session_id": session_id, "code": code})
        seen["failed"] = await client.call_tool("run_python", {"session_id": session_id, "code": "1 / 0"})
        outside = REPO / "tests" / "data" / "17127_ebd8fd46.jpg"
        seen["outside"] = await client.call_tool("load_image", {"path": str(outside)})
        seen["closed"] = await client.call_tool("close_session", {"session_id": session_id})
        seen["after_close"] = await client.call_tool("run_python", {"session_id": session_id, "code": "print(1)"})
    return seen


def test_mcp_stdio_crops_the_readme_example(tmp_path: Path, example: dict) -> None:
    image = tmp_path / "17127.jpg"
    shutil.copyfile(example["image"], image)
    seen = asyncio.run(_conversation(tmp_path, image, example["code"]))

    assert seen["tools"] == ["close_session", "load_image", "run_python"]
    loaded = seen["loaded"]
    assert not loaded.is_error and "image path for your code: " in loaded.content[0].text

    run = seen["run"]
    assert not run.is_error
    text, picture = run.content
    assert isinstance(text, TextContent) and text.text.startswith("ok: true")
    assert "saved images (1): 17127_" in text.text
    assert isinstance(picture, ImageContent) and picture.mime_type == "image/jpeg"
    assert np.array_equal(_decode(picture), cv2.imread(str(example["crop"])))

    failed = seen["failed"]
    assert not failed.is_error  # the code's error is data for the model, not a tool failure
    assert failed.content[0].text.startswith("ok: false\nerror: Sandbox for 17127: ")
    assert "division by zero" in failed.content[0].text

    outside = seen["outside"]
    assert outside.is_error and "is outside the allowed roots" in outside.content[0].text
    assert seen["closed"].content[0].text.endswith("closed")
    after = seen["after_close"]
    assert after.is_error and "does not exist" in after.content[0].text


async def _http_conversation(url: str, token: str, image: Path) -> dict[str, object]:
    import httpx2
    from mcp.client.streamable_http import streamable_http_client

    seen: dict[str, object] = {}
    async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=CALL_TIMEOUT_S) as http:
        async with Client(streamable_http_client(url, http_client=http)) as client:
            data = base64.b64encode(image.read_bytes()).decode()
            loaded = await client.call_tool("load_image", {"image_base64": data, "file_name": "17127.jpg"})
            session_id = loaded.content[0].text.split("session_id: ")[1].split("\n")[0]  # type: ignore[union-attr]
            seen["run"] = await client.call_tool("run_python", {"session_id": session_id, "code": "print(2 ** 10)"})
            seen["by_path"] = await client.call_tool("load_image", {"path": str(image)})
    return seen


def test_mcp_streamable_http_needs_token_and_takes_base64_images(tmp_path: Path, example: dict) -> None:
    import subprocess
    import time

    import httpx

    from tests.fixtures.sandbox_server import free_port

    port, token = free_port(), "mcp-token-1"
    (tmp_path / "token").write_text(token)
    command = [sys.executable, "-m", "thyme.cli", "sandbox", "mcp", "--transport", "http", "--port", str(port),
               "--token-file", str(tmp_path / "token"), "--workers", "1"]  # fmt: skip
    server = subprocess.Popen(command, cwd=REPO, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}/mcp"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                refused = httpx.post(url, json={})
                break
            except httpx.TransportError:
                assert server.poll() is None and time.monotonic() < deadline, "the MCP server did not start"
                time.sleep(0.2)
        assert refused.status_code == 401
        auth = {"Authorization": f"Bearer {token}"}
        rebound = httpx.post(url, json={}, headers=dict(auth, Host=f"evil.example:{port}"))
        assert rebound.status_code == 421 and rebound.json()["error"]["kind"] == "host_not_allowed"
        page = httpx.post(url, json={}, headers=dict(auth, Origin="http://evil.example"))
        assert page.status_code == 403
        seen = asyncio.run(_http_conversation(url, token, Path(example["image"])))
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert seen["run"].content[0].text == "ok: true\nprinted output:\n1024"
    assert seen["by_path"].is_error and "this server accepts uploads only" in seen["by_path"].content[0].text


def test_mcp_transport_security_uses_the_guard_host_names() -> None:
    from thyme.sandbox.server.guard import allowed_host_names
    from thyme.sandbox.server.mcp import transport_security

    settings = transport_security(allowed_host_names("127.0.0.1", ["box"]))
    assert settings.enable_dns_rebinding_protection
    assert {"box:*", "127.0.0.1:*", "[::1]:*", "localhost"} <= set(settings.allowed_hosts)
    assert "http://[::1]:*" in settings.allowed_origins
    assert not transport_security(None).enable_dns_rebinding_protection  # 0.0.0.0 with a token: any name
