"""From an OpenAI chat request to what the Thyme loop takes: the images (as files) and one question.

The loop answers one question about one or more images, so a chat is read this way:

- images: every ``image_url`` part of every user message, in order. A URL is a ``data:image/...;base64,`` URL
  (decoded to a private temporary file), an ``http(s)://`` URL that starts with an allowed prefix (downloaded, no
  redirects, size-capped), or a server file (``file://`` URL or absolute path) under an allowed root;
- question: the text of the last user message. Earlier user and assistant turns become a short preamble ("Earlier
  questions ... and their answers"), as the demo does for follow-ups: the released weights were trained on single
  questions, so a follow-up is a new trajectory that carries the conversation in its question;
- system messages are ignored: the agent's system prompt is the one the weights were trained with.
"""

from __future__ import annotations

import base64
import binascii
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from thyme.serve.config import ServeConfig

FOLLOW_UP_PREAMBLE = (
    "Earlier questions about these images and their answers:\n{history}\n\nNow answer this question:\n"
)
_DATA_URL = re.compile(r"^data:image/([\w.+-]+);base64,", re.IGNORECASE)
# The model reads the input's path in its prompt and often derives output names from it: give it an image suffix.
_SUFFIXES = {"jpeg": ".jpg", "jpg": ".jpg", "png": ".png", "webp": ".webp", "gif": ".gif", "bmp": ".bmp",
             "tiff": ".tiff"}  # fmt: skip


class ApiError(Exception):
    """A request the server refuses, with the HTTP status and the OpenAI-style error ``type``."""

    def __init__(self, status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.kind, self.message, self.headers = status, kind, message, headers


@dataclass
class ChatInput:
    """A parsed request: the images as files, the question, and the folder to remove when the answer is done."""

    images: list[Path]
    question: str
    work_dir: Path
    preamble_turns: int = 0
    _removed: bool = field(default=False, repr=False)

    def cleanup(self) -> None:
        if not self._removed:
            shutil.rmtree(self.work_dir, ignore_errors=True)
            self._removed = True


def _bad(message: str) -> ApiError:
    return ApiError(400, "invalid_request_error", message)


def _parts(message: dict[str, Any], index: int) -> list[dict[str, Any]]:
    content = message.get("content")
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list) or not all(isinstance(part, dict) for part in content):
        raise _bad(f"messages[{index}].content must be a string or a list of content parts")
    return content


def _text(parts: list[dict[str, Any]]) -> str:
    return "\n".join(str(part.get("text", "")) for part in parts if part.get("type") == "text").strip()


def _image_url(part: dict[str, Any], where: str) -> str:
    value = part.get("image_url")
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str) or not url:
        raise _bad(f"{where}: an image_url part needs {{'image_url': {{'url': ...}}}}")
    return url


def parse_chat(body: dict[str, Any], config: ServeConfig, fetch: Any) -> ChatInput:
    """Reads ``body["messages"]`` (see the module docstring) and materialises its images in a new temp folder.

    Args:
        body: the request JSON.
        config: the server's limits and allow-lists.
        fetch: ``fetch(url, target_path)`` downloads an allowed http(s) URL (injected so tests need no network).

    Raises:
        ApiError: 400 for a malformed chat, 403 for a URL or path outside the allow-lists.
    """
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise _bad("'messages' must be a non-empty list of chat messages")
    user_indices = [i for i, m in enumerate(messages) if m.get("role") == "user"]
    if not user_indices or user_indices[-1] != len(messages) - 1:
        raise _bad("the last message must be the user's question (role 'user')")
    urls: list[tuple[str, str]] = []
    history: list[str] = []
    for index, message in enumerate(messages):
        parts = _parts(message, index)
        role = message.get("role")
        for number, part in enumerate(parts):
            if part.get("type") == "image_url":
                if role != "user":
                    raise _bad(f"messages[{index}]: images are only read from user messages")
                urls.append((_image_url(part, f"messages[{index}].content[{number}]"), f"messages[{index}]"))
            elif part.get("type") not in ("text", "image_url"):
                raise _bad(f"messages[{index}].content[{number}]: part type {part.get('type')!r} is not supported "
                           "(use 'text' and 'image_url')")  # fmt: skip
        if index != len(messages) - 1 and role in ("user", "assistant") and _text(parts):
            history.append(f"{'Q' if role == 'user' else 'A'}: {_text(parts)}")
    question = _text(_parts(messages[-1], len(messages) - 1))
    if not question:
        raise _bad("the last user message has no text: ask a question about the image(s)")
    if not urls:
        raise _bad("no image in the chat: add an image_url part (a data: URL, an allowed http(s) URL or a file)")
    if len(urls) > config.max_images:
        raise _bad(f"{len(urls)} images in the chat; this server takes at most {config.max_images} per question")
    if history:
        question = FOLLOW_UP_PREAMBLE.format(history="\n".join(history)) + question
    work_dir = Path(tempfile.mkdtemp(prefix="thyme-serve-in-"))
    try:
        images = [
            _materialize(url, where, number, work_dir, config, fetch) for number, (url, where) in enumerate(urls)
        ]
    except BaseException:
        shutil.rmtree(work_dir, ignore_errors=True)
        raise
    return ChatInput(images, question, work_dir, len(history))


def _materialize(url: str, where: str, number: int, work_dir: Path, config: ServeConfig, fetch: Any) -> Path:
    data_url = _DATA_URL.match(url)
    if data_url:
        try:
            data = base64.b64decode(url.split(",", 1)[1], validate=True)
        except (binascii.Error, ValueError) as exc:
            raise _bad(f"{where}: the data URL is not valid base64 ({exc})") from exc
        target = work_dir / f"image_{number}{_SUFFIXES.get(data_url.group(1).lower(), '')}"
        target.write_bytes(data)
        return target
    if url.startswith(("http://", "https://")):
        if not any(url.startswith(prefix) for prefix in config.allowed_url_prefixes):
            allowed = ", ".join(config.allowed_url_prefixes) or "none: this server fetches no URLs"
            raise ApiError(403, "url_not_allowed", f"{where}: the server may not fetch {url!r} (allowed prefixes: "
                           f"{allowed}); send the image as a data: URL instead")  # fmt: skip
        suffix = Path(urlsplit(url).path).suffix.lower()
        target = work_dir / f"image_{number}{suffix if suffix.lstrip('.') in _SUFFIXES else ''}"
        fetch(url, target)
        return target
    if url.startswith("data:"):
        raise _bad(f"{where}: only base64 image data URLs are read (data:image/<type>;base64,...)")
    path = url[len("file://") :] if url.startswith("file://") else url
    if not path.startswith("/"):
        raise _bad(f"{where}: {url[:80]!r} is neither a data: URL, an http(s) URL nor an absolute server path")
    from thyme.sandbox.server.errors import RequestRejected
    from thyme.sandbox.server.inputs import resolve_server_path

    try:
        return resolve_server_path(path, config.allowed_roots, max_pixels=10**12)  # the agent checks the pixels
    except RequestRejected as exc:
        raise ApiError(exc.status or 400, exc.kind, f"{where}: {exc}") from exc


def http_fetch(config: ServeConfig):
    """A ``fetch(url, target)`` that downloads with httpx: no redirects (they could leave the allow-list), at most
    ``config.max_request_bytes`` bytes, ``config.fetch_timeout_s`` seconds."""

    def fetch(url: str, target: Path) -> None:
        import httpx

        try:
            with httpx.stream("GET", url, timeout=config.fetch_timeout_s, follow_redirects=False) as response:
                if response.status_code != 200:
                    raise ApiError(400, "image_fetch_failed", f"fetching {url} answered HTTP {response.status_code}")
                size = 0
                with target.open("wb") as handle:
                    for chunk in response.iter_bytes():
                        size += len(chunk)
                        if size > config.max_request_bytes:
                            raise ApiError(413, "image_too_large", f"{url} is larger than "
                                           f"{config.max_request_bytes:,} bytes")  # fmt: skip
                        handle.write(chunk)
        except httpx.HTTPError as exc:
            raise ApiError(400, "image_fetch_failed", f"cannot fetch {url}: {exc}") from exc

    return fetch


__all__ = ["ApiError", "ChatInput", "FOLLOW_UP_PREAMBLE", "http_fetch", "parse_chat"]
