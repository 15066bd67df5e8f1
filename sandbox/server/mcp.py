"""The sandbox as an MCP server, so any MCP client (a desktop assistant, another agent) can crop and zoom images.

Three tools over one :class:`~.sessions.SessionRegistry` (the same limits as the HTTP server):

- ``load_image``: opens a session on an image given by path (under an allowed root) or as base64 data; answers
  with the session id and the path the code must open.
- ``run_python``: runs Python in that session; answers with the printed text and, as image content, every image
  the code saved. Variables persist between calls, as in a Thyme conversation.
- ``close_session``: frees the session and deletes its files.

Run it with ``thyme sandbox mcp`` (stdio, for desktop clients) or ``--transport http`` (streamable HTTP at
``/mcp``). The ``mcp`` SDK is imported here only, so ``import thyme.sandbox`` works without the server extra.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

try:
    from mcp.server.mcpserver import MCPServer
    from mcp.server.mcpserver.exceptions import ToolError
    from mcp.server.transport_security import TransportSecuritySettings
    from mcp.types import ImageContent, TextContent
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError("the MCP server needs the mcp SDK: pip install 'thyme-vlm[server]'") from exc

from ..errors import SandboxError
from ..returned import open_returned_image
from .app import IMAGE_MIME_TYPES, uvicorn_config
from .config import ServerConfig
from .errors import RequestRejected
from .inputs import resolve_server_path, save_uploads
from .metrics import ServerMetrics
from .sessions import SandboxLike, SessionRegistry

logger = logging.getLogger(__name__)

SERVER_NAME = "thyme-sandbox"
MCP_PATH = "/mcp"
MAX_IMAGES_RETURNED = 8  # a program that saves more gets the first ones as images and the rest named in the text

INSTRUCTIONS = """\
Think with images: load an image, then run Python on it to crop, zoom, rotate or enhance regions you need to see
better, and look at the images your code saves. The code runs in a sandbox with cv2, numpy, PIL, math and the
standard library's safe modules; open the image at the path load_image returned, save results under
/mnt/data/temp_processed_images/ and print each saved path; those images come back to you. Variables persist
between run_python calls of one session. Close the session when done."""

RUN_DESCRIPTION = """\
Run Python on the session's image(s). Open the image at the path load_image returned (cv2.imread or
PIL.Image.open), save each result with cv2.imwrite or Image.save under /mnt/data/temp_processed_images/ and
print its path: every printed saved image is returned as image content, after a text part with the printed
output or the error. Example: crop and zoom a region:
img = cv2.imread(path); crop = img[y1:y2, x1:x2]; big = cv2.resize(crop, None, fx=2, fy=2)
out = '/mnt/data/temp_processed_images/crop.png'; cv2.imwrite(out, big); print(out)"""


class SandboxTools:
    """The tool functions, bound to one registry; plain methods so tests can call them without a client.

    Args:
        registry (`SessionRegistry`): where sessions live.
        config (`ServerConfig`): allowed roots and size limits.
        upload_root (`Path`): where base64 images are written (one folder per session).
    """

    def __init__(self, registry: SessionRegistry, config: ServerConfig, upload_root: Path) -> None:
        self.registry = registry
        self.config = config
        self.upload_root = upload_root

    def load_image(self, path: str | None = None, image_base64: str | None = None,
                   file_name: str = "image.png") -> str:  # fmt: skip
        """Opens a sandbox session on one image, given as a file path on this machine or as base64 data.

        Args:
            path: absolute path of an image file (it must lie under one of the server's allowed folders).
            image_base64: the image file's bytes, base64-encoded (when the file is not on this machine).
            file_name: the name to give base64 data (its extension tells the format); default image.png.

        Returns:
            The session id, the image path the code must open, and the image size.
        """
        if (path is None) == (image_base64 is None):
            raise ToolError("pass exactly one of path (a file on this machine) or image_base64 (the file's bytes)")
        upload_dir = Path(tempfile.mkdtemp(dir=self.upload_root))
        try:
            if path is not None:
                inputs = [resolve_server_path(path, self.config.allowed_roots, self.config.max_pixels)]
            else:
                inputs = save_uploads([(file_name, io.BytesIO(self._decode(image_base64 or "")))], upload_dir,
                                      self.config.max_pixels)  # fmt: skip
            entry = self.registry.open([str(p) for p in inputs], upload_dir=upload_dir)
        except SandboxError as exc:
            shutil.rmtree(upload_dir, ignore_errors=True)
            raise ToolError(str(exc)) from exc
        image_path = entry.session.input_paths[0]
        return (
            f"session_id: {entry.session_id}\nimage path for your code: {image_path}\n"
            f"save images under: /mnt/data/temp_processed_images/ (print each saved path)\n"
            f"the session closes after {self.config.idle_timeout_s:g} s without use"
        )

    def _decode(self, data: str) -> bytes:
        limit = self.config.max_request_bytes
        if len(data) * 3 // 4 > limit:
            raise RequestRejected(
                f"the image data is about {len(data) * 3 // 4:,} bytes; the server accepts at most {limit:,}",
                kind="request_too_large", status=413,
            )  # fmt: skip
        try:
            return base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise RequestRejected(f"image_base64 is not valid base64 ({exc}): send the file's bytes base64-encoded") \
                from exc

    def run_python(self, session_id: str, code: str) -> list[TextContent | ImageContent]:
        """Runs Python code in a session and returns its printed output and the images it saved.

        Args:
            session_id: the id load_image returned.
            code: the Python source to run.
        """
        if len(code) > self.config.max_code_chars:
            raise ToolError(f"the code is {len(code):,} characters; the server accepts at most "
                            f"{self.config.max_code_chars:,}")  # fmt: skip
        try:
            _, result = self.registry.run(session_id, code)
        except SandboxError as exc:
            raise ToolError(str(exc)) from exc
        shown = result.images[:MAX_IMAGES_RETURNED]
        lines = [f"ok: {str(result.ok).lower()}"]
        if result.error:
            lines.append(f"error: {result.error}")
        if result.stdout:
            lines.append(f"printed output:\n{result.stdout.rstrip()}")
        if result.images:
            lines.append(f"saved images ({len(result.images)}): " + ", ".join(Path(p).name for p in result.images))
        if len(result.images) > len(shown):
            lines.append(f"only the first {len(shown)} images are returned as image content")
        content: list[TextContent | ImageContent] = [TextContent(type="text", text="\n".join(lines))]
        for image in shown:
            opened = open_returned_image(image)  # a regular file of this session's results, never through a link
            if opened is None:
                raise ToolError(f"the saved image {Path(image).name!r} is no longer there: run the code again")
            with opened[0] as file:
                data = base64.b64encode(file.read()).decode()
            mime = IMAGE_MIME_TYPES.get(Path(image).suffix.lower(), "application/octet-stream")
            content.append(ImageContent(type="image", data=data, mime_type=mime))
        return content

    def close_session(self, session_id: str) -> str:
        """Closes a session and deletes its images.

        Args:
            session_id: the id load_image returned.
        """
        try:
            self.registry.close(session_id)
        except SandboxError as exc:
            raise ToolError(str(exc)) from exc
        return f"session {session_id} closed"


def build_mcp_server(
    config: ServerConfig, sandbox: SandboxLike, upload_root: Path
) -> tuple[MCPServer, SessionRegistry]:
    """Builds the MCP server with its three tools over ``sandbox``.

    Args:
        config (`ServerConfig`): limits and allowed roots (the same fields as the HTTP server).
        sandbox (`SandboxLike`): a local ``Sandbox`` or a ``RemoteSandbox``; the caller closes it.
        upload_root (`Path`): an existing folder for images sent as base64.

    Returns:
        `tuple[MCPServer, SessionRegistry]`: the server, and the registry the caller closes on shutdown.
    """
    registry = SessionRegistry(sandbox, ServerMetrics(), max_sessions=config.max_sessions or 1,
                               max_queue=config.max_queue, queue_wait_s=config.queue_wait_s,
                               idle_timeout_s=config.idle_timeout_s)  # fmt: skip
    tools = SandboxTools(registry, config, upload_root)
    server = MCPServer(SERVER_NAME, instructions=INSTRUCTIONS, log_level="WARNING")
    server.add_tool(tools.load_image, name="load_image", description=tools.load_image.__doc__)
    server.add_tool(tools.run_python, name="run_python", description=RUN_DESCRIPTION, structured_output=False)
    server.add_tool(tools.close_session, name="close_session", description="Close a session and delete its images.")
    return server, registry


def run_mcp(config: ServerConfig, sandbox: SandboxLike, transport: str) -> None:
    """Serves the MCP tools until the client disconnects (stdio) or the process is interrupted (http).

    Args:
        config (`ServerConfig`): limits, roots, and for ``http`` the host, port and token.
        sandbox (`SandboxLike`): the pool the sessions come from; the caller closes it.
        transport (`str`): ``"stdio"`` or ``"http"`` (streamable HTTP at ``/mcp``).
    """
    with tempfile.TemporaryDirectory(prefix="thyme-mcp-uploads-") as upload_root:
        server, registry = build_mcp_server(config, sandbox, Path(upload_root))
        try:
            if transport == "stdio":
                server.run("stdio")
            else:
                _run_http(server, config)
        finally:
            registry.close_all()


def _run_http(server: MCPServer, config: ServerConfig) -> None:
    import uvicorn

    from .guard import BrowserGuard, allowed_host_names
    from .limits import BodySizeLimit

    hosts = allowed_host_names(config.host, config.allowed_hosts)
    app: Any = server.streamable_http_app(streamable_http_path=MCP_PATH, host=config.host,
                                          transport_security=transport_security(hosts))  # fmt: skip
    app = BodySizeLimit(app, config.max_request_bytes)
    if config.token is not None:
        app = BearerTokenGate(app, config.token)
    app = BrowserGuard(app, hosts, client_header_required=config.token is None)
    uvicorn.Server(uvicorn_config(app, config)).run()


def transport_security(hosts: frozenset[str] | None) -> TransportSecuritySettings:
    """The SDK's own DNS-rebinding protection, set to the same host names as :class:`~.guard.BrowserGuard`.

    The guard in front already refuses foreign hosts and origins; the SDK's check stays on as a second line, as the
    MCP transport guidance asks (the SDK turns it on by itself only for the exact hosts 127.0.0.1, localhost, ::1).
    """
    if hosts is None:
        return TransportSecuritySettings(enable_dns_rebinding_protection=False)
    names = sorted(f"[{host}]" if ":" in host else host for host in hosts)
    return TransportSecuritySettings(
        enable_dns_rebinding_protection=True,
        allowed_hosts=[pattern for name in names for pattern in (name, f"{name}:*")],
        allowed_origins=[pattern for name in names for pattern in (f"http://{name}", f"http://{name}:*")],
    )


class BearerTokenGate:
    """ASGI middleware: answers 401 to HTTP requests without ``Authorization: Bearer <token>``.

    The SDK's own auth is OAuth (an authorization server and token verifier); a shared static token is what a
    private tool server needs, and this is the whole of it.
    """

    def __init__(self, app: Any, token: str) -> None:
        self.app = app
        self._expected = f"Bearer {token}".encode()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        import hmac

        if scope["type"] == "http":
            given = dict(scope.get("headers") or ()).get(b"authorization", b"")
            if not hmac.compare_digest(given, self._expected):
                body = b'{"error": {"kind": "unauthorized", "message": "send Authorization: Bearer <token>"}}'
                await send({"type": "http.response.start", "status": 401,
                            "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)
