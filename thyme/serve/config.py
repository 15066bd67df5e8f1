"""Settings of ``thyme serve``, one dataclass validated once (the CLI maps its flags onto the fields)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from thyme.errors import ConfigError
from thyme.sandbox.server.config import DEFAULT_REQUEST_TIMEOUT_S, is_loopback_host

DEFAULT_PORT = 8000
DEFAULT_MAX_REQUEST_MB = 48.0  # a few full-resolution photos as base64 data URLs
DEFAULT_MAX_IMAGES = 8
DEFAULT_KEPT_RESPONSES = 200


@dataclass
class ServeConfig:
    """Access rules and limits of the agent server.

    Args:
        host: the interface to bind; anything but loopback needs a token and ``allowed_hosts``.
        port: the TCP port.
        token: the bearer token clients must send (None: no token, loopback only).
        model_name: the model id ``/v1/models`` lists and completions report.
        max_running: questions answered at the same time (1 for a local model: one GPU, one forward at a time).
        max_queue: questions waiting for a slot; one more is refused at once with 429.
        queue_wait_s: a waiting question that gets no slot in this time is answered 503.
        max_request_bytes: the largest request body (413 above).
        max_images: images per question.
        allowed_hosts: more ``Host`` names clients reach the server by (a loopback server accepts the loopback
            names and these; see ``thyme.sandbox.server.guard``, the browser guard all Thyme servers share).
        allowed_url_prefixes: ``http(s)://`` image URLs the server may fetch must start with one of these (none by
            default: the server fetches nothing, so a request cannot make it reach the network).
        allowed_roots: server folders whose image files a request may name by path (none by default).
        fetch_timeout_s: time limit of one image download.
        kept_responses: how many recent answers keep their crops downloadable (older ones are deleted).
        request_timeout_s: a request whose headers and body have not all arrived in this time is dropped (a slow
            client cannot hold a connection open).
    """

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    token: str | None = None
    model_name: str = "thyme"
    max_running: int = 4
    max_queue: int = 16
    queue_wait_s: float = 30.0
    max_request_bytes: int = int(DEFAULT_MAX_REQUEST_MB * 2**20)
    max_images: int = DEFAULT_MAX_IMAGES
    allowed_hosts: list[str] = field(default_factory=list)
    allowed_url_prefixes: list[str] = field(default_factory=list)
    allowed_roots: list[Path] = field(default_factory=list)
    fetch_timeout_s: float = 20.0
    kept_responses: int = DEFAULT_KEPT_RESPONSES
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S

    def __post_init__(self) -> None:
        for name in ("max_running", "max_images", "kept_responses", "max_request_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} ({getattr(self, name)}) must be at least 1")
        if self.kept_responses < self.max_running + self.max_queue:
            raise ConfigError(
                f"kept_responses ({self.kept_responses}) must be at least max_running + max_queue "
                f"({self.max_running + self.max_queue}): answers still in flight keep their crop folders"
            )
        if self.max_queue < 0 or min(self.queue_wait_s, self.fetch_timeout_s, self.request_timeout_s) <= 0:
            raise ConfigError("max_queue must be >= 0; queue_wait_s, fetch_timeout_s and request_timeout_s > 0")
        if not is_loopback_host(self.host) and self.token is None:
            raise ConfigError(
                f"--host {self.host} makes the agent reachable from other machines: give a --token-file "
                "(everyone who can reach it can run code in the sandbox and spend your model's time)"
            )
        for prefix in self.allowed_url_prefixes:
            if not prefix.startswith(("http://", "https://")) or prefix.count("/") < 3:
                raise ConfigError(
                    f"--allow-url-prefix {prefix!r} must be an http(s) URL with a path, e.g. https://example.org/img/ "
                    "(a bare host prefix would also match https://example.org.attacker.net)"
                )
        self.allowed_roots = [Path(root).resolve() for root in self.allowed_roots]
        for root in self.allowed_roots:
            if not root.is_dir():
                raise ConfigError(f"--allow-root {root} is not a directory")
