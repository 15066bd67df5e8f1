"""prefix_cache=True gives exactly the full re-prefill's tokens and log-probs, while encoding less, and never keeps a
stale image: two sandbox images of one size have identical token ids but must still be told apart."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from thyme import protocol
from thyme.backends.base import SamplingParams
from thyme.backends.prefix_cache import PrefixCache
from thyme.errors import ConfigError

GREEDY = SamplingParams(max_new_tokens=8)


@pytest.fixture(scope="module")
def backends(tiny_model_dir: Path):
    from thyme.backends.local import TransformersBackend

    torch.set_num_threads(1)
    plain = TransformersBackend.from_pretrained(tiny_model_dir, device="cpu")
    cached = TransformersBackend.from_pretrained(tiny_model_dir, device="cpu", prefix_cache=True)
    return plain, cached


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(2)
    paths = []
    for index in range(3):  # same size: the same number of image tokens, different pixels
        path = folder / f"image{index}.png"
        Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def _chat(user_image: str, assistant: list[dict] | None) -> list[dict]:
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "You are a helpful assistant."}]},
        {"role": "user", "content": [{"type": "image", "image": user_image}, {"type": "text", "text": "\nQ?"}]},
    ]
    return messages + ([{"role": "assistant", "content": assistant}] if assistant else [])


def _with_sandbox_image(text: str, image: str) -> list[dict]:
    return [
        {"type": "text", "text": f"{text}{protocol.SANDBOX_OUTPUT_OPEN}"},
        {"type": "image", "image": image},
        {"type": "text", "text": f"{protocol.SANDBOX_OUTPUT_CLOSE}Now"},
    ]


def _assert_same(cached, plain) -> None:
    assert cached.token_ids == plain.token_ids
    assert cached.logprobs == pytest.approx(plain.logprobs, abs=1e-4)
    assert (cached.text, cached.finish_reason) == (plain.text, plain.finish_reason)


def test_prefix_cache_matches_full_prefill_over_a_trajectory(backends, images) -> None:
    plain, cached = backends
    first_chat = _chat(images[0], [{"type": "text", "text": f"{protocol.THINK_OPEN}Zoom.{protocol.CODE_OPEN}"}])
    first = cached.generate(first_chat, stop=[], sampling=GREEDY)
    _assert_same(first, plain.generate(first_chat, stop=[], sampling=GREEDY))
    # The next call holds the model's own text, then a sandbox image: the cache covers the earlier prompt and more.
    text = f"{protocol.THINK_OPEN}Zoom.{protocol.CODE_OPEN}{first.text}{protocol.CODE_CLOSE}"
    second_chat = _chat(images[0], _with_sandbox_image(text, images[1]))
    expected = plain.generate(second_chat, stop=[], sampling=GREEDY)
    second = cached.generate(second_chat, stop=[], sampling=GREEDY)
    _assert_same(second, expected)
    assert second.prompt_tokens <= expected.prompt_tokens - first.prompt_tokens


def test_prefix_cache_encodes_a_different_sandbox_image_of_the_same_size(backends, images) -> None:
    plain, cached = backends
    one = _chat(images[0], _with_sandbox_image(protocol.CODE_CLOSE, images[1]))
    other = _chat(images[0], _with_sandbox_image(protocol.CODE_CLOSE, images[2]))
    assert torch.equal(plain.prepare_inputs(one)["input_ids"], plain.prepare_inputs(other)["input_ids"])
    cached.generate(one, stop=[], sampling=GREEDY)
    result = cached.generate(other, stop=[], sampling=GREEDY)  # same ids as the cached sequence, new pixels
    expected = plain.generate(other, stop=[], sampling=GREEDY)
    _assert_same(result, expected)
    assert result.logprobs[0] != pytest.approx(plain.generate(one, stop=[], sampling=GREEDY).logprobs[0], abs=1e-6)
    # Reuse stopped at the changed image: its 6 tokens and everything after were run again.
    tail = plain.tokenizer(f"<|vision_end|>{protocol.SANDBOX_OUTPUT_CLOSE}Now").input_ids
    assert result.prompt_tokens == 6 + len(tail)


def test_prefix_cache_switches_conversations(backends, images) -> None:
    plain, cached = backends
    cached.generate(_chat(images[0], _with_sandbox_image("a", images[1])), stop=[], sampling=GREEDY)
    fresh = _chat(images[2], [{"type": "text", "text": "b"}])
    _assert_same(cached.generate(fresh, stop=[], sampling=GREEDY), plain.generate(fresh, stop=[], sampling=GREEDY))
    new_turn = _chat(images[2], None)
    _assert_same(
        cached.generate(new_turn, stop=[], sampling=GREEDY), plain.generate(new_turn, stop=[], sampling=GREEDY)
    )


def test_prefix_cache_takes_positions_from_the_new_conversation(backends, images) -> None:
    """A second conversation that shares the first one's prefix (system, user image) and adds no image after it: the
    cached M-RoPE offset (rope_deltas) of the first conversation, which had a sandbox image more, must not be used."""
    plain, cached = backends
    cached.generate(_chat(images[0], _with_sandbox_image("a", images[1])), stop=[], sampling=GREEDY)
    other = _chat(images[0], [{"type": "text", "text": "a plain answer"}])
    result = cached.generate(other, stop=[], sampling=GREEDY)
    assert result.prompt_tokens < len(plain.prepare_inputs(other)["input_ids"][0])  # the prefix was reused
    _assert_same(result, plain.generate(other, stop=[], sampling=GREEDY))


def test_prefix_cache_refuses_unverified_model_types() -> None:
    model = SimpleNamespace(config=SimpleNamespace(model_type="qwen3_vl", image_token_id=1))
    with pytest.raises(ConfigError, match="prefix_cache is verified only for qwen2_5_vl, not 'qwen3_vl'"):
        PrefixCache(model, merge_size=2)
