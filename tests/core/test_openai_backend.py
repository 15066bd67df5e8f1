"""OpenAIBackend against a real HTTP server (the tiny model behind vLLM-style chat completions), official client."""

from __future__ import annotations

import base64
import io
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.fixtures.openai_server import SERVED_MODEL_NAME, serve
from thyme import protocol
from thyme.backends.base import FINISH_LENGTH, FINISH_STOP, SamplingParams
from thyme.backends.openai_compat import OpenAIBackend
from thyme.errors import BackendError, ConfigError

GREEDY = SamplingParams(max_new_tokens=8)


@pytest.fixture(scope="module")
def local(tiny_model_dir: Path):
    from thyme.backends.local import TransformersBackend

    return TransformersBackend.from_pretrained(tiny_model_dir, device="cpu")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(1)
    paths = []
    for index in range(2):
        path = folder / f"image{index}.png"
        Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def _chat(images: list[str], assistant_text: str = "Now") -> list[dict]:
    """User image, then a partial assistant message holding a sandbox image: images in two turns."""
    return [
        {"role": "system", "content": [{"type": "text", "text": "You are a helpful assistant."}]},
        {
            "role": "user",
            "content": [{"type": "image", "image": images[0]}, {"type": "text", "text": "\nWhat is it?"}],
        },
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": f"{protocol.THINK_OPEN}x{protocol.CODE_CLOSE}{protocol.SANDBOX_OUTPUT_OPEN}"},
                {"type": "image", "image": images[1]},
                {"type": "text", "text": f"{protocol.SANDBOX_OUTPUT_CLOSE}{assistant_text}"},
            ],
        },
    ]


def _decoded_images(body: dict) -> list[tuple[str, Image.Image]]:
    """(role, image) for every data-URL image in a recorded request body."""
    found = []
    for message in body["messages"]:
        for part in message["content"] if isinstance(message["content"], list) else []:
            if part["type"] == "image_url":
                header, data = part["image_url"]["url"].split(",", 1)
                found.append((message["role"], header, Image.open(io.BytesIO(base64.b64decode(data)))))
    return found


def test_openai_backend_continues_the_assistant_message_with_images_in_two_turns(
    tiny_openai_server, local, images
) -> None:
    backend = OpenAIBackend(tiny_openai_server.url)
    assert backend.model == SERVED_MODEL_NAME  # discovered from /v1/models
    generation = backend.generate(_chat(images), stop=[], sampling=GREEDY)
    body = tiny_openai_server.requests[-1]
    assert body["continue_final_message"] is True and body["add_generation_prompt"] is False
    sent = _decoded_images(body)
    assert [(role, header) for role, header, _ in sent] == [("user", "data:image/png;base64")] + [
        ("assistant", "data:image/png;base64")
    ]
    assert [image.size for _, _, image in sent] == [(84, 56), (84, 56)]  # smart-resized 96x64 before upload
    # Same pixels, same prompt as the local backend: the server's model saw both images and continued the message.
    expected = local.generate(_chat(images), stop=[], sampling=GREEDY)
    assert (generation.text, generation.finish_reason) == (expected.text, FINISH_LENGTH)
    assert generation.prompt_tokens == expected.prompt_tokens
    assert generation.token_ids is None and generation.logprobs is None


def test_openai_backend_opens_a_new_assistant_turn(tiny_openai_server, local, images) -> None:
    chat = _chat(images)[:2]
    generation = OpenAIBackend(tiny_openai_server.url, model=SERVED_MODEL_NAME).generate(
        chat, stop=[], sampling=GREEDY
    )
    body = tiny_openai_server.requests[-1]
    assert body["continue_final_message"] is False and body["add_generation_prompt"] is True
    assert generation.text == local.generate(chat, stop=[], sampling=GREEDY).text


def test_openai_backend_puts_the_dropped_stop_string_back(tiny_openai_server, local, images) -> None:
    full = local.generate(_chat(images), stop=[], sampling=GREEDY).text
    # A two-character string the model writes whose first occurrence lies wholly in the new text ("Now" ends the
    # prompt; a stop begun in the prompt is a transformers-only case).
    stop = next(full[i : i + 2] for i in range(1, len(full) - 1) if ("Now" + full).find(full[i : i + 2], 2) >= 3)
    expected = local.generate(_chat(images), stop=["never-produced", stop], sampling=GREEDY)
    generation = OpenAIBackend(tiny_openai_server.url).generate(
        _chat(images), stop=["never-produced", stop], sampling=GREEDY
    )
    assert tiny_openai_server.requests[-1]["stop"] == ["never-produced", stop]
    assert generation.finish_reason == expected.finish_reason == FINISH_STOP
    assert generation.text == expected.text and generation.text.endswith(stop)


def test_openai_backend_sends_sampling_knobs(tiny_openai_server, images) -> None:
    sampling = SamplingParams(temperature=0.7, top_p=0.9, top_k=50, repetition_penalty=1.05, max_new_tokens=4, seed=7)
    OpenAIBackend(tiny_openai_server.url).generate(_chat(images), stop=[protocol.CODE_CLOSE], sampling=sampling)
    body = tiny_openai_server.requests[-1]
    assert (body["temperature"], body["top_p"], body["top_k"], body["repetition_penalty"]) == (0.7, 0.9, 50, 1.05)
    assert (body["max_tokens"], body["seed"], body["stop"]) == (4, 7, [protocol.CODE_CLOSE])


def test_openai_backend_sends_neutral_sampling_values_too(tiny_openai_server, images) -> None:
    # A vLLM server fills every field a request leaves out from the checkpoint's generation_config.json
    # (Qwen2.5-VL: repetition penalty 1.05): "off" must be said, not implied. tests/vllm checks a real server.
    OpenAIBackend(tiny_openai_server.url).generate(_chat(images), stop=[], sampling=GREEDY)
    body = tiny_openai_server.requests[-1]
    assert (body["temperature"], body["top_p"], body["top_k"], body["min_p"]) == (0.0, 1.0, -1, 0.0)
    assert (body["repetition_penalty"], body["presence_penalty"], body["frequency_penalty"]) == (1.0, 0.0, 0.0)


def test_openai_backend_shrinks_large_photos_and_keeps_jpeg(tiny_openai_server, tmp_path: Path) -> None:
    photo = tmp_path / "photo.jpg"
    Image.new("RGB", (640, 480), (200, 30, 30)).save(photo, quality=90)
    chat = [{"role": "user", "content": [{"type": "image", "image": str(photo)}, {"type": "text", "text": "Q"}]}]
    OpenAIBackend(tiny_openai_server.url, max_pixels=28 * 28 * 16).generate(chat, stop=[], sampling=GREEDY)
    [(role, header, image)] = _decoded_images(tiny_openai_server.requests[-1])
    assert header == "data:image/jpeg;base64" and image.size == (112, 84)


def _flaky_app(failures: int, status: int, seen: list[float], delay_s: float = 0.0):
    """An app whose chat endpoint fails ``failures`` times with ``status`` before answering "ok"."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    app = FastAPI()

    @app.post("/v1/chat/completions")
    def chat(body: dict):
        seen.append(time.monotonic())
        time.sleep(delay_s)
        if len(seen) <= failures:
            return JSONResponse({"error": {"message": "boom"}}, status_code=status)
        message = {"role": "assistant", "content": "ok "}
        choice = {"index": 0, "message": message, "finish_reason": "stop", "stop_reason": protocol.ANSWER_CLOSE}
        usage = {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}
        return {
            "id": "c",
            "object": "chat.completion",
            "created": 0,
            "model": "m",
            "choices": [choice],
            "usage": usage,
        }

    return app


def test_openai_backend_retries_server_errors_with_backoff() -> None:
    seen: list[float] = []
    with serve(_flaky_app(failures=2, status=503, seen=seen)) as root:
        backend = OpenAIBackend(f"{root}/v1", model="m", max_retries=3)
        generation = backend.generate(
            [{"role": "user", "content": "hi"}], stop=[protocol.ANSWER_CLOSE], sampling=GREEDY
        )
    assert len(seen) == 3  # two 503s, then the answer
    assert seen[1] - seen[0] >= 0.3  # the client backed off (openai: 0.5 s initial delay, jittered by up to 25 %)
    assert generation.text == f"ok {protocol.ANSWER_CLOSE}" and generation.finish_reason == FINISH_STOP
    assert generation.prompt_tokens == 9


def test_openai_backend_error_status_names_url_and_status() -> None:
    seen: list[float] = []
    with serve(_flaky_app(failures=99, status=500, seen=seen)) as root:
        backend = OpenAIBackend(f"{root}/v1", model="m", max_retries=0)
        with pytest.raises(BackendError, match=f"^{root}/v1/chat/completions answered HTTP 500: boom$"):
            backend.generate([{"role": "user", "content": "hi"}], stop=[], sampling=GREEDY)
    assert len(seen) == 1


def test_openai_backend_timeout_is_a_backend_error() -> None:
    with serve(_flaky_app(failures=0, status=200, seen=[], delay_s=1.0)) as root:
        backend = OpenAIBackend(f"{root}/v1", model="m", timeout_s=0.2, max_retries=0)
        with pytest.raises(BackendError, match=f"^{root}/v1 did not answer within 0.2 s"):
            backend.generate([{"role": "user", "content": "hi"}], stop=[], sampling=GREEDY)


def test_openai_backend_unreachable_server_is_a_backend_error() -> None:
    import socket

    with socket.socket() as sock:  # a port nobody listens on once closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(BackendError, match=f"^cannot reach http://127.0.0.1:{port}/v1: is the server running"):
        OpenAIBackend(f"http://127.0.0.1:{port}/v1", max_retries=0)


def test_openai_backend_refuses_a_non_http_endpoint() -> None:
    with pytest.raises(ConfigError, match="endpoint 'localhost:8000' is not an http"):
        OpenAIBackend("localhost:8000")
