"""OpenAIBackend against a REAL vLLM server (``python -m vllm.entrypoints.openai.api_server``) on the tiny model.

The model's generation_config.json asks for repetition penalty 10 and top-k 1 (conftest), which vLLM applies to
any field a request leaves out; the greedy tokens equal the in-process engine's only if the backend sends every
sampling field itself.
"""

from __future__ import annotations

import pytest

from tests.vllm.conftest import SERVED_NAME, chat, expected_prompt_tokens
from thyme.backends.base import FINISH_LENGTH, FINISH_STOP, SamplingParams
from thyme.backends.openai_compat import OpenAIBackend
from thyme.errors import BackendError

GREEDY = SamplingParams(max_new_tokens=12)


@pytest.fixture(scope="module")
def backend(vllm_server):
    client = OpenAIBackend(vllm_server.url)
    yield client
    client.close()


def test_the_server_serves_the_tiny_model_by_name(backend) -> None:
    assert backend.model == SERVED_NAME


def test_continuing_with_a_sandbox_image_counts_its_tokens(backend, vllm_engine, images) -> None:
    messages = chat(images)
    generation = backend.generate(messages, stop=[], sampling=GREEDY)
    # Same pixels, same tokens: the data URL carries the resized image, the server expands it to 16 tokens.
    assert generation.prompt_tokens == expected_prompt_tokens(vllm_engine.processor, messages)
    assert generation.finish_reason == FINISH_LENGTH


def test_greedy_request_overrides_the_checkpoint_sampling_defaults(backend, vllm_engine, images) -> None:
    expected = vllm_engine.generate(chat(images), stop=[], sampling=GREEDY)
    assert backend.generate(chat(images), stop=[], sampling=GREEDY).text == expected.text
    # What the server applies to a request that leaves the fields out: the checkpoint's penalty 10 changes the
    # tokens. (Without this the equality above could not tell a request that said "1.0" from one that said nothing.)
    sloppy = backend.client.chat.completions.create(
        model=backend.model,
        messages=[backend._to_openai_message(message) for message in chat(images)],
        max_tokens=12,
        temperature=0.0,
        extra_body={"continue_final_message": True, "add_generation_prompt": False},
    )
    assert sloppy.choices[0].message.content != expected.text


def test_stop_strings_and_finish_reasons(backend, images) -> None:
    full = backend.generate(chat(images), stop=[], sampling=GREEDY).text
    stop = full[1:3]  # the random model repeats itself: the stop's FIRST occurrence ends the text
    generation = backend.generate(chat(images), stop=["never-produced", stop], sampling=GREEDY)
    assert generation.finish_reason == FINISH_STOP
    assert generation.text == full[: full.index(stop) + len(stop)]  # the server dropped it; the backend restores it


def test_server_errors_name_the_status_and_the_reason(backend, vllm_server, images) -> None:
    too_long = chat(images)
    too_long[1]["content"][1]["text"] = " word" * 3000  # beyond --max-model-len 2048
    with pytest.raises(BackendError, match=r"answered HTTP 400: .*(longer|maximum)"):
        backend.generate(too_long, stop=[], sampling=GREEDY)
    unknown = OpenAIBackend(vllm_server.url, model="no-such-model", max_retries=0)
    with pytest.raises(BackendError, match=r"answered HTTP 404: .*no-such-model"):
        unknown.generate(chat(images), stop=[], sampling=GREEDY)
