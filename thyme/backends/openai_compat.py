"""Any OpenAI-compatible chat-completions server (vLLM, SGLang, LMDeploy) as a Thyme backend.

Thyme keeps ONE assistant message per trajectory and appends sandbox output inside it (thyme-reference.md section
7), so every call after the first asks the server to continue the final assistant message. vLLM's chat endpoint
does that with the extra parameters ``continue_final_message=true, add_generation_prompt=false`` (they are
exclusive); the message may hold the sandbox images, which go as data URLs like any other image.

Every sampling field is sent, neutral values included: a vLLM server fills each field a request leaves out from
the checkpoint's ``generation_config.json`` (Qwen2.5-VL: repetition penalty 1.05, top-k 1), so a left-out
"repetition penalty 1.0" would silently become 1.05 and a greedy eval would not be the local backend's.
``tests/vllm/test_openai_server.py`` checks this against a real vLLM server.

Servers drop the stop string from the returned text; the contract wants ``Generation.text`` to END with it, so the
matched string is put back from ``stop_reason`` (vLLM) or ``matched_stop`` (SGLang). Images are resized by the
same smart-resize rules as the local backend before upload, so a 12-megapixel photo is not sent at full size.

This module imports no torch: a client machine needs only ``pip install 'thyme-vlm[openai]'``.
"""

from __future__ import annotations

import base64
import io
import logging
from collections.abc import Sequence
from typing import Any

import openai

from thyme.backends.base import FINISH_EOS, FINISH_LENGTH, FINISH_STOP, Generation, SamplingParams
from thyme.backends.vision_inputs import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_PIXELS,
    QWEN2_VL_IMAGE_FACTOR,
    image_format,
    prepare_image,
)
from thyme.errors import BackendError, ConfigError

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 600.0  # one call may generate 2048 tokens of a 7B model on a busy server
DEFAULT_MAX_RETRIES = 3  # the openai client retries 408/409/429/5xx and connection errors with exponential backoff
# vLLM runs without authentication unless started with --api-key; the client still needs a non-empty key.
UNAUTHENTICATED_API_KEY = "EMPTY"
# top_k "off" on the wire: vLLM takes 0 or -1 (it documents -1 as accepted), SGLang accepts only -1.
TOP_K_OFF = -1
_JPEG_QUALITY = 95
_JPEG_FORMATS = ("JPEG", "MPO")


class OpenAIBackend:
    """Continues a Thyme chat on an OpenAI-compatible server; see :class:`thyme.backends.base.Backend`.

    Args:
        base_url: The server's API root, e.g. ``http://127.0.0.1:8000/v1``.
        model: The served model name; ``None`` asks ``/models`` and takes the first (vLLM serves one).
        api_key: The server's key (vLLM ``--api-key``); ``None`` for an open server.
        timeout_s: Seconds one request may take before it is abandoned (then retried).
        max_retries: Retries of timeouts, connection errors, 408/409/429 and 5xx answers, with backoff.
        min_pixels: Smallest image area sent, for images without their own ``min_pixels``.
        max_pixels: Largest image area sent, for images without their own ``max_pixels``.
        image_factor: Side multiple of the model's vision encoder (28 for Qwen2/2.5-VL, 32 for Qwen3-VL).
        extra_body: More server-specific request fields (e.g. ``{"mm_processor_kwargs": {...}}``).

    Example:
        >>> backend = OpenAIBackend("http://127.0.0.1:8000/v1")  # doctest: +SKIP
        >>> backend.generate(messages, stop=["</code>", "</answer>"], sampling=SamplingParams())  # doctest: +SKIP
    """

    def __init__(
        self,
        base_url: str,
        model: str | None = None,
        *,
        api_key: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        max_retries: int = DEFAULT_MAX_RETRIES,
        min_pixels: int = DEFAULT_MIN_PIXELS,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        image_factor: int = QWEN2_VL_IMAGE_FACTOR,
        extra_body: dict[str, Any] | None = None,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ConfigError(f"endpoint {base_url!r} is not an http(s) URL: pass e.g. http://127.0.0.1:8000/v1")
        if max_pixels < min_pixels:
            raise ConfigError(
                f"max_pixels ({max_pixels}) < min_pixels ({min_pixels}): raise max_pixels or lower min_pixels"
            )
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.image_options = {"factor": image_factor, "min_pixels": min_pixels, "max_pixels": max_pixels}
        self.extra_body = dict(extra_body or {})
        self.client = openai.OpenAI(
            base_url=self.base_url,
            api_key=api_key or UNAUTHENTICATED_API_KEY,
            timeout=timeout_s,
            max_retries=max_retries,
        )
        self.model = model or self._served_model()

    def generate(self, messages: list[dict], *, stop: Sequence[str], sampling: SamplingParams) -> Generation:
        """Continues ``messages`` until a string in ``stop``, the end of the turn, or ``sampling.max_new_tokens``.

        ``prompt_tokens`` is what the server reports, minus the prefix-cache hits it reports
        (``usage.prompt_tokens_details.cached_tokens``, vLLM ``--enable-prompt-tokens-details``). Token ids and
        logprobs are not returned (``None``): servers report log-probs after their own processing.

        Raises:
            BackendError: The server cannot be reached, times out, or answers with an error status (the message
                names the URL and the status).
        """
        continuing = bool(messages) and messages[-1].get("role") == "assistant"
        extra_body = {
            **self.extra_body,
            "continue_final_message": continuing,
            "add_generation_prompt": not continuing,
            # Not OpenAI fields, so they travel in extra_body; every one explicit (see the module docstring).
            "top_k": sampling.top_k if sampling.top_k > 0 else TOP_K_OFF,
            "min_p": 0.0,
            "repetition_penalty": sampling.repetition_penalty,
        }
        try:
            response = self.client.chat.completions.create(
                model=self.model,
                messages=[self._to_openai_message(message) for message in messages],
                max_tokens=sampling.max_new_tokens,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                presence_penalty=0.0,
                frequency_penalty=0.0,
                seed=sampling.seed,
                stop=list(stop) or None,
                extra_body=extra_body,
            )
        except openai.OpenAIError as exc:
            raise self._backend_error(exc) from exc
        if not response.choices:
            raise BackendError(f"{self.base_url}/chat/completions answered with no choices: check the server log")
        return self._to_generation(response, stop)

    def close(self) -> None:
        """Closes the HTTP connection pool."""
        self.client.close()

    def _served_model(self) -> str:
        """The first model the server lists (vLLM names it after ``--served-model-name`` or the path)."""
        try:
            models = self.client.models.list().data
        except openai.OpenAIError as exc:
            raise self._backend_error(exc) from exc
        if not models:
            raise BackendError(f"{self.base_url}/models lists no model: pass the model name explicitly")
        return models[0].id

    def _to_openai_message(self, message: dict) -> dict:
        """Hugging Face chat items -> OpenAI content parts; images become resized data URLs."""
        content = message.get("content")
        if not isinstance(content, list):
            return {"role": message["role"], "content": content}
        parts = []
        for item in content:
            if item.get("type") == "image" or "image" in item:
                parts.append({"type": "image_url", "image_url": {"url": self._image_data_url(item)}})
            else:
                parts.append({"type": "text", "text": item.get("text", "")})
        return {"role": message["role"], "content": parts}

    def _image_data_url(self, item: dict) -> str:
        """Resized image as a data URL: JPEG stays JPEG (quality 95), everything else is sent as lossless PNG."""
        jpeg = image_format(item["image"]) in _JPEG_FORMATS
        image = prepare_image(item, **self.image_options)
        buffer = io.BytesIO()
        if jpeg:
            image.save(buffer, format="JPEG", quality=_JPEG_QUALITY)
        else:
            image.save(buffer, format="PNG")
        mime = "image/jpeg" if jpeg else "image/png"
        return f"data:{mime};base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}"

    def _to_generation(self, response: Any, stop: Sequence[str]) -> Generation:
        """Maps the server's finish reason, restoring the dropped stop string."""
        choice = response.choices[0]
        text = choice.message.content or ""
        matched = getattr(choice, "stop_reason", None) or getattr(choice, "matched_stop", None)
        if choice.finish_reason == "length":
            finish_reason = FINISH_LENGTH
        elif isinstance(matched, str) and matched in stop:
            finish_reason = FINISH_STOP
            text = text if text.endswith(matched) else text + matched
        else:
            finish_reason = FINISH_EOS
        usage = response.usage
        prompt_tokens = usage.prompt_tokens if usage else 0
        details = getattr(usage, "prompt_tokens_details", None) if usage else None
        if details is not None and details.cached_tokens:
            prompt_tokens -= details.cached_tokens
        return Generation(text=text, finish_reason=finish_reason, prompt_tokens=prompt_tokens)

    def _backend_error(self, exc: openai.OpenAIError) -> BackendError:
        """One line naming the URL, the status and what to check."""
        if isinstance(exc, openai.APITimeoutError):
            return BackendError(f"{self.base_url} did not answer within {self.timeout_s:g} s (retries included)")
        if isinstance(exc, openai.APIConnectionError):
            return BackendError(f"cannot reach {self.base_url}: is the server running and the URL right? ({exc})")
        if isinstance(exc, openai.APIStatusError):
            return BackendError(f"{exc.request.url} answered HTTP {exc.status_code}: {_error_text(exc)}")
        return BackendError(f"request to {self.base_url} failed: {exc}")


def _error_text(exc: openai.APIStatusError) -> str:
    """The server's error message (vLLM: ``{"error": {"message": ...}}`` or ``{"message": ...}``), else the body."""
    body = exc.body
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
    return str(exc.message)


__all__ = ["DEFAULT_MAX_RETRIES", "DEFAULT_TIMEOUT_S", "OpenAIBackend"]
