"""Settings of the sandbox tool server (``thyme sandbox serve`` and ``thyme sandbox mcp``).

One dataclass holds every knob of the HTTP server and the MCP server, each with its help text next to it (the TRL
config style), validated once in ``__post_init__``. The CLI maps its flags one-to-one onto these fields.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InvalidInput
from ..limits import DEFAULT_MAX_PIXELS, DEFAULT_TIMEOUT_S

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
DEFAULT_WORKERS = 2
DEFAULT_SESSIONS_PER_WORKER = 4
DEFAULT_MAX_REQUEST_MB = 32.0
DEFAULT_IDLE_TIMEOUT_S = 600.0
DEFAULT_QUEUE_WAIT_S = 10.0
DEFAULT_MAX_QUEUE = 16
DEFAULT_MAX_CODE_CHARS = 100_000
DEFAULT_MAX_IMAGES_PER_SESSION = 8
DEFAULT_REQUEST_TIMEOUT_S = 30.0

LOOPBACK_NAMES = frozenset({"localhost", "ip6-localhost"})


def is_loopback_host(host: str) -> bool:
    """Tells whether binding ``host`` keeps the server reachable from this machine only.

    Args:
        host (`str`): a host name or an IP address, as given to ``--host``.

    Returns:
        `bool`: True for ``localhost`` and every loopback address (127.0.0.0/8, ::1); False otherwise, including
        the wildcard addresses ``0.0.0.0`` and ``::``, which listen on every interface.
    """
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def read_token_file(path: Path) -> str:
    """Reads a bearer token from a file (the first line, surrounding blanks removed).

    A file rather than a flag keeps the secret out of ``ps`` output and shell history.

    Raises:
        InvalidInput: the file is missing, unreadable or empty.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidInput(f"cannot read the token file {path}: {exc.strerror}; pass an existing file") from exc
    lines = text.strip().splitlines()
    token = lines[0].strip() if lines else ""
    if not token:
        raise InvalidInput(f"the token file {path} is empty: write the token on its first line")
    return token


@dataclass
class ServerConfig:
    """Limits and access rules of the sandbox tool server.

    > Network and access

    Parameters:
        host (`str`, defaults to `"127.0.0.1"`): address to listen on. A non-loopback address needs a token.
        port (`int`, defaults to `8765`): TCP port to listen on.
        token (`str`, *optional*): bearer token every API call must carry (``Authorization: Bearer <token>``).
        allowed_roots (`list[Path]`): folders whose images a client may name by server-side path; empty refuses
            every server-side path, so images must be uploaded.
        allowed_hosts (`list[str]`): more names clients reach the server by (``Host`` header). A loopback server
            accepts only loopback names and these, so a web page cannot re-point its own name at it (DNS
            rebinding); a server on another address accepts any name unless this lists them.
        request_timeout_s (`float`, defaults to `30.0`): a request whose headers and body have not all arrived
            within this time is dropped (a half-sent request never holds a connection for long).

    > Sandbox pool and limits

    Parameters:
        workers (`int`, defaults to `2`): warm sandbox worker processes kept ready.
        timeout_s (`float`, defaults to `10.0`): wall-clock limit of one code run.
        max_sessions (`int`, *optional*): open sessions at once; defaults to 4 per worker.
        max_queue (`int`, defaults to `16`): requests that may wait for a free session slot; more get "busy".
        queue_wait_s (`float`, defaults to `10.0`): how long a request waits for a slot before "busy".
        idle_timeout_s (`float`, defaults to `600.0`): a session unused this long is closed.
        max_request_mb (`float`, defaults to `32.0`): largest request body accepted.
        max_pixels (`int`, defaults to `64_000_000`): largest image (width x height), input or written.
        max_code_chars (`int`, defaults to `100_000`): longest program accepted.
        max_images_per_session (`int`, defaults to `8`): input images one session may hold.
    """

    host: str = field(default=DEFAULT_HOST, metadata={"help": "address to listen on (non-loopback needs a token)"})
    port: int = field(default=DEFAULT_PORT, metadata={"help": "TCP port to listen on"})
    token: str | None = field(default=None, repr=False, metadata={"help": "bearer token required on API calls"})
    allowed_roots: list[Path] = field(
        default_factory=list, metadata={"help": "folders whose images clients may name by server-side path"}
    )
    allowed_hosts: list[str] = field(
        default_factory=list, metadata={"help": "more host names clients reach the server by (Host header)"}
    )
    request_timeout_s: float = field(
        default=DEFAULT_REQUEST_TIMEOUT_S, metadata={"help": "seconds a request's headers and body may take to arrive"}
    )
    workers: int = field(default=DEFAULT_WORKERS, metadata={"help": "warm sandbox worker processes"})
    timeout_s: float = field(default=DEFAULT_TIMEOUT_S, metadata={"help": "wall-clock limit of one code run"})
    max_sessions: int | None = field(default=None, metadata={"help": "open sessions at once (default 4 per worker)"})
    max_queue: int = field(default=DEFAULT_MAX_QUEUE, metadata={"help": "requests that may wait for a session slot"})
    queue_wait_s: float = field(default=DEFAULT_QUEUE_WAIT_S, metadata={"help": "seconds to wait for a slot"})
    idle_timeout_s: float = field(default=DEFAULT_IDLE_TIMEOUT_S, metadata={"help": "close sessions idle this long"})
    max_request_mb: float = field(default=DEFAULT_MAX_REQUEST_MB, metadata={"help": "largest request body, in MB"})
    max_pixels: int = field(default=DEFAULT_MAX_PIXELS, metadata={"help": "largest input image, width x height"})
    max_code_chars: int = field(default=DEFAULT_MAX_CODE_CHARS, metadata={"help": "longest program accepted"})
    max_images_per_session: int = field(
        default=DEFAULT_MAX_IMAGES_PER_SESSION, metadata={"help": "input images one session may hold"}
    )

    def __post_init__(self) -> None:
        if self.max_sessions is None:
            self.max_sessions = DEFAULT_SESSIONS_PER_WORKER * self.workers
        self.allowed_roots = [Path(root).resolve() for root in self.allowed_roots]
        positive = {
            "workers": self.workers, "timeout_s": self.timeout_s, "max_sessions": self.max_sessions,
            "queue_wait_s": self.queue_wait_s, "idle_timeout_s": self.idle_timeout_s,
            "max_request_mb": self.max_request_mb, "max_pixels": self.max_pixels,
            "max_code_chars": self.max_code_chars, "max_images_per_session": self.max_images_per_session,
            "request_timeout_s": self.request_timeout_s,
        }  # fmt: skip
        for name, value in positive.items():
            if value <= 0:
                raise InvalidInput(f"{name} must be positive, got {value}: pass a value above 0")
        if self.max_queue < 0:
            raise InvalidInput(f"max_queue must be 0 or more, got {self.max_queue}")
        if not 0 < self.port < 65536:
            raise InvalidInput(f"port must be between 1 and 65535, got {self.port}")
        for root in self.allowed_roots:
            if not root.is_dir():
                raise InvalidInput(f"allowed root {root} is not a folder: pass an existing folder to --allow-root")
        if self.token is not None and not self.token.strip():
            raise InvalidInput("the token is empty: pass a non-empty token or none at all")
        if self.token is None and not is_loopback_host(self.host):
            raise InvalidInput(
                f"refusing to listen on {self.host} without a token: anyone who can reach it could run code. "
                "Pass --token-file FILE, or listen on 127.0.0.1"
            )

    @property
    def max_request_bytes(self) -> int:
        """The request-body limit in bytes (``max_request_mb`` counts 2**20 bytes per MB)."""
        return int(self.max_request_mb * 2**20)
