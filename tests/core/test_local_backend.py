"""TransformersBackend on the tiny Qwen2.5-VL: real from_pretrained, images in two turns, stops, logprobs, errors."""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from thyme import protocol
from thyme.backends.base import FINISH_EOS, FINISH_LENGTH, FINISH_STOP, SamplingParams
from thyme.errors import ConfigError, ModelNotFoundError

GREEDY = SamplingParams(max_new_tokens=8)


@pytest.fixture(scope="module")
def backend(tiny_model_dir: Path):
    from thyme.backends.local import TransformersBackend

    torch.set_num_threads(1)
    return TransformersBackend.from_pretrained(tiny_model_dir, device="cpu")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Three different small noise images (64x96 px: 6 tokens each for the tiny model)."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = []
    for index in range(3):
        path = folder / f"image{index}.png"
        Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def _chat(user_image: str, sandbox_image: str | None) -> list[dict]:
    """System, user turn with an image, and a partial assistant message holding a sandbox image (Thyme's layout)."""
    assistant: list[dict] = [{"type": "text", "text": f"{protocol.THINK_OPEN}Zoom in.{protocol.CODE_OPEN}x"}]
    if sandbox_image is not None:
        assistant[0]["text"] += f"{protocol.CODE_CLOSE}{protocol.SANDBOX_OUTPUT_OPEN}"
        assistant += [
            {"type": "image", "image": sandbox_image},
            {"type": "text", "text": protocol.SANDBOX_OUTPUT_CLOSE},
        ]
    return [
        {"role": "system", "content": [{"type": "text", "text": "You are a helpful assistant."}]},
        {
            "role": "user",
            "content": [{"type": "image", "image": user_image}, {"type": "text", "text": "\nWhat is it?"}],
        },
        {"role": "assistant", "content": assistant},
    ]


def test_local_backend_sandbox_image_changes_next_token_logits(backend, images) -> None:
    # The original eval reused a DynamicCache and the model never saw its crops (reference 1.8): with the same text,
    # a different sandbox image MUST change what the model predicts next.
    first = backend.next_token_logits(_chat(images[0], images[1]))
    again = backend.next_token_logits(_chat(images[0], images[1]))
    other = backend.next_token_logits(_chat(images[0], images[2]))
    assert torch.equal(first, again)
    assert (first - other).abs().max().item() > 1e-4


def test_local_backend_encodes_images_of_both_turns(backend, images) -> None:
    messages = _chat(images[0], images[1])
    inputs = backend.prepare_inputs(messages)
    assert inputs["image_grid_thw"].tolist() == [[1, 4, 6], [1, 4, 6]]
    image_pad = backend.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert int((inputs["input_ids"] == image_pad).sum()) == 12  # 2 images x (4x6 patches / 2x2 merge)
    prompt = backend.render(messages)
    assert prompt.endswith(f"<|vision_start|><|image_pad|><|vision_end|>{protocol.SANDBOX_OUTPUT_CLOSE}")
    assert "<|im_start|>assistant\n" in prompt and prompt.count("<|im_start|>assistant") == 1


def test_local_backend_continues_the_assistant_message_and_opens_a_new_turn(backend, images) -> None:
    messages = _chat(images[0], None)
    assert backend.render(messages).endswith(
        f"<|im_start|>assistant\n{protocol.THINK_OPEN}Zoom in.{protocol.CODE_OPEN}x"
    )
    # A final image (no text after it) stays in the prompt instead of being cut with the continuation.
    trailing_image = [*messages[:2], {"role": "assistant", "content": [*messages[2]["content"], {"image": images[1]}]}]
    assert backend.render(trailing_image).endswith("x<|vision_start|><|image_pad|><|vision_end|>")
    assert backend.render(messages[:2]).endswith("What is it?<|im_end|>\n<|im_start|>assistant\n")
    assert messages == _chat(images[0], None)  # the caller's messages are left as they were


def test_local_backend_honours_per_image_pixel_limits(backend, images) -> None:
    messages = _chat(images[0], images[1])
    unrestricted = backend.generate(messages, stop=[], sampling=GREEDY).prompt_tokens
    # 64x96 px under a 1568-px cap -> 28x28 px -> 2x2 patches -> one merged token instead of six.
    messages[2]["content"][1] = {"type": "image", "image": images[1], "max_pixels": 28 * 28 * 2}
    assert backend.prepare_inputs(messages)["image_grid_thw"].tolist() == [[1, 4, 6], [1, 2, 2]]
    assert backend.generate(messages, stop=[], sampling=GREEDY).prompt_tokens == unrestricted - 6 + 1


def test_local_backend_greedy_generation_reports_ids_and_raw_logprobs(backend, images) -> None:
    messages = _chat(images[0], images[1])
    generation = backend.generate(messages, stop=[], sampling=GREEDY)
    logits = backend.next_token_logits(messages)
    assert generation.finish_reason == FINISH_LENGTH and len(generation.token_ids) == 8
    assert generation.token_ids[0] == int(logits.argmax())
    assert generation.logprobs[0] == pytest.approx(
        torch.log_softmax(logits, -1)[generation.token_ids[0]].item(), abs=1e-4
    )
    assert generation.text == backend.tokenizer.decode(generation.token_ids, skip_special_tokens=True)
    assert generation.prompt_tokens == backend.prepare_inputs(messages)["input_ids"].shape[1]
    # top_k=1 sampling at any temperature picks the argmax: same tokens, and the SAME temperature-1 logprobs.
    hot = backend.generate(messages, stop=[], sampling=SamplingParams(temperature=0.3, top_k=1, max_new_tokens=8))
    assert hot.token_ids == generation.token_ids
    assert hot.logprobs == pytest.approx(generation.logprobs, abs=1e-5)


def test_local_backend_sampling_is_seeded(backend, images) -> None:
    messages = _chat(images[0], images[1])
    sampling = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, repetition_penalty=1.05, max_new_tokens=8, seed=3)
    first = backend.generate(messages, stop=[], sampling=sampling)
    assert backend.generate(messages, stop=[], sampling=sampling).token_ids == first.token_ids
    assert len(first.logprobs) == len(first.token_ids) == 8 and all(value < 0 for value in first.logprobs)


def test_local_backend_stops_at_a_stop_string_and_keeps_it(backend, images) -> None:
    messages = _chat(images[0], images[1])
    messages[2]["content"][-1] = {"type": "text", "text": f"{protocol.SANDBOX_OUTPUT_CLOSE}Now"}
    full = backend.generate(messages, stop=[], sampling=GREEDY)
    stop = full.text[1:3]  # a string the model is known to produce, which need not align with token boundaries
    stopped = backend.generate(messages, stop=["never-produced", stop], sampling=GREEDY)
    assert stopped.finish_reason == FINISH_STOP
    # Generation ends where the stop string is first completed in the stream prompt + new text ("Now" + text).
    # (Occurrences wholly inside the prompt do not count, hence the search from the prompt's last character.)
    assert stopped.text == full.text[: ("Now" + full.text).find(stop, len("Now") - 1) + len(stop) - len("Now")]
    assert stopped.token_ids == full.token_ids[: len(stopped.token_ids)] and len(stopped.token_ids) < 8
    # The stop strings of earlier rounds already in the prompt (the closing code tag) do not end the new text.
    assert backend.generate(messages, stop=[protocol.CODE_CLOSE], sampling=GREEDY).finish_reason == FINISH_LENGTH


def test_local_backend_stop_string_begun_in_the_prompt_counts(backend, images) -> None:
    messages = _chat(images[0], images[1])
    first = backend.tokenizer.decode(backend.generate(messages, stop=[], sampling=GREEDY).token_ids[:1])
    last_char = protocol.SANDBOX_OUTPUT_CLOSE[-1]  # the prompt ends with it
    generation = backend.generate(messages, stop=[last_char + first[0]], sampling=GREEDY)
    assert generation.finish_reason == FINISH_STOP and generation.text == first[0]


def test_local_backend_reports_end_of_turn(tiny_model_dir: Path, images) -> None:
    from thyme.backends.local import TransformersBackend

    backend = TransformersBackend.from_pretrained(tiny_model_dir, device="cpu")
    messages = _chat(images[0], images[1])
    first_token = backend.generate(messages, stop=[], sampling=GREEDY).token_ids[0]
    backend.eos_token_ids = [first_token]  # make the model's first pick the end of the turn
    generation = backend.generate(messages, stop=[], sampling=GREEDY)
    assert generation.finish_reason == FINISH_EOS and generation.token_ids == [first_token]


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("/nonexistent/thyme-weights", "model not found: /nonexistent/thyme-weights is not a directory"),
        ("no-such-org/no-such-thyme-model", "model not found: no-such-org/no-such-thyme-model is not in the local"),
    ],
)
def test_local_backend_missing_model_names_path_and_how_to_get_weights(source: str, expected: str) -> None:
    from thyme.backends.local import TransformersBackend

    with pytest.raises(ModelNotFoundError) as info:
        TransformersBackend.from_pretrained(source)
    assert expected in str(info.value)
    assert "hf download Kwai-Keye/Thyme-RL --local-dir DIR" in str(info.value)


def test_local_backend_directory_without_checkpoint_is_refused(tmp_path: Path) -> None:
    from thyme.backends.local import TransformersBackend

    with pytest.raises(ModelNotFoundError, match=f"{tmp_path} has no config.json, so it is not a model checkpoint"):
        TransformersBackend.from_pretrained(tmp_path)


@pytest.fixture(scope="module")
def tiny_qwen3_vl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen3-VL shipped with the REAL Qwen3-VL chat template when trl has a copy (it drops assistant images)."""
    from thyme.tiny import build_tiny_model

    path = build_tiny_model(tmp_path_factory.mktemp("qwen3") / "tiny", model_type="qwen3_vl")
    if find_spec("trl") is not None:
        import trl

        template = Path(trl.__file__).parent / "chat_templates" / "qwen3_vl.jinja"
        (path / "chat_template.jinja").write_text(template.read_text(encoding="utf-8"), encoding="utf-8")
    return path


def test_local_backend_runs_qwen3_vl_and_keeps_its_sandbox_images(tiny_qwen3_vl_dir: Path, images) -> None:
    from thyme.backends.local import TransformersBackend

    backend = TransformersBackend.from_pretrained(tiny_qwen3_vl_dir, device="cpu")
    assert type(backend.model).__name__ == "Qwen3VLForConditionalGeneration"
    messages = _chat(images[0], images[1])
    # 64x96 px -> smart-resize with 32-px factor -> 64x96 -> 4x6 patches of 16 px, for both turns' images.
    assert backend.prepare_inputs(messages)["image_grid_thw"].tolist() == [[1, 4, 6], [1, 4, 6]]
    other = backend.next_token_logits(_chat(images[0], images[2]))
    assert (backend.next_token_logits(messages) - other).abs().max().item() > 1e-4
    generation = backend.generate(messages, stop=[], sampling=GREEDY)
    assert len(generation.token_ids) == len(generation.logprobs) == 8


@pytest.mark.skipif(find_spec("trl") is None, reason="trl ships the reference Qwen3-VL chat template")
def test_local_backend_refuses_a_template_that_drops_assistant_images(tiny_qwen3_vl_dir: Path, images) -> None:
    from thyme.backends.local import TransformersBackend

    template = (tiny_qwen3_vl_dir / "chat_template.jinja").read_text(encoding="utf-8")
    backend = TransformersBackend.from_pretrained(tiny_qwen3_vl_dir, device="cpu", chat_template=template)
    with pytest.raises(ConfigError, match=r"the chat template rendered 1 image slot\(s\) for 2 image\(s\): it drops"):
        backend.generate(_chat(images[0], images[1]), stop=[], sampling=GREEDY)
