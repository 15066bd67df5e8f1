"""PolicyBackend on the real tiny model: sampled and greedy calls report the ids and temperature-1 log-probs that a
forward pass over the kept sequence gives, and loop-appended tokens are masked."""

from __future__ import annotations

import threading

import pytest
import torch

from thyme.backends.base import SamplingParams
from thyme.errors import BackendError
from thyme.train.policy import PolicyBackend


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForImageTextToText

    from thyme.backends.processor import load_processor

    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir).eval()
    return model, load_processor(tiny_model_dir, 28 * 28, 256 * 256)


def _messages(image: str, assistant: list[dict] | None = None) -> list[dict]:
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "You are Thyme."}]},
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "\nWhat is it?"}]},
    ]
    if assistant:
        messages.append({"role": "assistant", "content": assistant})
    return messages


def _forward_logprobs(backend: PolicyBackend, model, new: int) -> torch.Tensor:
    """Temperature-1 log-probs of the last ``new`` kept tokens by one full forward pass (what the loss does)."""
    inputs = backend._model_inputs()
    with torch.no_grad():
        logits = model(**inputs).logits[0, -new - 1 : -1].float()
    ids = inputs["input_ids"][0, -new:]
    return torch.log_softmax(logits, dim=-1).gather(1, ids[:, None])[:, 0]


@pytest.mark.parametrize("sampling", [SamplingParams(temperature=0.0, max_new_tokens=6),
                                      SamplingParams(temperature=1.0, top_p=0.9, top_k=50, repetition_penalty=1.05,
                                                     max_new_tokens=6)])  # fmt: skip
def test_policy_backend_reports_the_losss_logprobs(tiny, readme_image, sampling):
    model, processor = tiny
    torch.manual_seed(0)
    backend = PolicyBackend(model, processor, lock=threading.Lock())
    generation = backend.generate(_messages(readme_image), stop=["</answer>"], sampling=sampling)
    assert len(generation.token_ids) == 6 and generation.finish_reason == "length"
    assert backend.tokens.completion_ids == generation.token_ids and backend.tokens.tool_mask == [1] * 6
    want = _forward_logprobs(backend, model, 6)
    assert torch.allclose(torch.tensor(generation.logprobs), want, atol=1e-4)
    vision = processor.tokenizer.convert_tokens_to_ids(["<|image_pad|>", "<|video_pad|>", "<|vision_start|>"])
    assert not set(generation.token_ids) & set(vision)


def test_policy_backend_masks_what_the_loop_appends_and_keeps_its_images(tiny, readme_image):
    model, processor = tiny
    backend = PolicyBackend(model, processor, lock=threading.Lock())
    greedy = SamplingParams(temperature=0.0, max_new_tokens=3)
    first = backend.generate(_messages(readme_image), stop=[], sampling=greedy)
    appended = [
        {"type": "text", "text": first.text + "<sandbox_output>"},
        {"type": "image", "image": readme_image},
        {"type": "text", "text": "</sandbox_output>"},
    ]
    backend.generate(_messages(readme_image, appended), stop=[], sampling=greedy)
    tokens = backend.tokens
    assert tokens.tool_mask[:3] == [1, 1, 1] and tokens.tool_mask[-3:] == [1, 1, 1]
    loop_ids = [t for t, m in zip(tokens.completion_ids, tokens.tool_mask, strict=True) if m == 0]
    text = processor.tokenizer.decode(loop_ids)
    assert text.startswith("<sandbox_output><|vision_start|><|image_pad|>") and text.endswith("</sandbox_output>")
    assert len(tokens.images) == 2 and len(tokens.image_spans) == 1
    start, end = tokens.image_spans[0]
    assert processor.tokenizer.decode(tokens.completion_ids[end - 1 : end]) == "<|vision_end|>"
    assert tokens.completion_ids[start] == processor.tokenizer.convert_tokens_to_ids("<|vision_start|>")


def test_policy_backend_refuses_edited_history(tiny, readme_image):
    model, processor = tiny
    backend = PolicyBackend(model, processor, lock=threading.Lock())
    greedy = SamplingParams(temperature=0.0, max_new_tokens=3)
    first = backend.generate(_messages(readme_image), stop=[], sampling=greedy)
    edited = [{"type": "text", "text": "X" + first.text}]
    with pytest.raises(BackendError, match="changed assistant text the policy already generated"):
        backend.generate(_messages(readme_image, edited), stop=[], sampling=greedy)


def test_policy_backend_cut_drops_an_image_split_by_the_completion_cap(tiny, readme_image):
    model, processor = tiny
    backend = PolicyBackend(model, processor, lock=threading.Lock(), max_completion_tokens=10)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=3)
    first = backend.generate(_messages(readme_image), stop=[], sampling=greedy)
    appended = [
        {"type": "text", "text": first.text + "<sandbox_output>"},
        {"type": "image", "image": readme_image},
        {"type": "text", "text": "</sandbox_output>"},
    ]
    assert backend.generate(_messages(readme_image, appended), stop=[], sampling=greedy).text == ""
    tokens = backend.finish(answered=False)
    # Cut where the image block starts: its pad tokens would have no pixels in the loss forward.
    assert processor.tokenizer.decode(tokens.completion_ids[3:]) == "<sandbox_output>"
    assert len(tokens.completion_ids) == len(tokens.tool_mask) == len(tokens.logprobs) < 10
    assert len(tokens.images) == 1 and tokens.image_spans == []


@pytest.mark.parametrize("ats", [True, False])
def test_trainer_backend_samples_code_too_when_ats_is_off(tiny, readme_image, ats):
    from types import SimpleNamespace
    from unittest.mock import Mock

    from thyme.config import AgentConfig
    from thyme.train.trainer import ThymeGRPOTrainer

    model, processor = tiny
    trainer = Mock(spec=ThymeGRPOTrainer)
    trainer.args = SimpleNamespace(ats=ats, max_completion_length=64)
    trainer.loop_config = AgentConfig(sampling="ats", max_new_tokens=6)
    trainer._script, trainer.processing_class, trainer._model_lock = None, processor, threading.Lock()
    greedy = SamplingParams(temperature=0.0, max_new_tokens=6)  # what the loop asks for inside <code>
    reference = PolicyBackend(model, processor, lock=threading.Lock()).generate(
        _messages(readme_image), stop=[], sampling=greedy
    )
    torch.manual_seed(0)
    backend = ThymeGRPOTrainer._backend(trainer, model)
    got = backend.generate(_messages(readme_image), stop=[], sampling=greedy)
    assert (got.token_ids == reference.token_ids) is ats


def test_policy_backend_cuts_a_script_at_the_token_cap(tiny, readme_image):
    from thyme.backends.scripted import ScriptedBackend

    model, processor = tiny
    script = ScriptedBackend(["<think>a long scripted thought that goes on</think>\n<answer>C</answer>"])
    backend = PolicyBackend(model, processor, lock=threading.Lock(), script=script, max_completion_tokens=5)
    generation = backend.generate(_messages(readme_image), stop=["</answer>"], sampling=SamplingParams())
    assert len(generation.token_ids) == 5 and generation.finish_reason == "length"
    assert generation.text == processor.tokenizer.decode(generation.token_ids)
    assert backend.generate(_messages(readme_image, [{"type": "text", "text": generation.text}]), stop=[],
                            sampling=SamplingParams()).text == ""  # fmt: skip


def test_greedy_code_tokens_inside_a_code_span_report_temperature_1_logprobs(tiny, readme_image):
    """The loop's ATS call inside `<code>` (greedy, code stop strings): every token it writes reports the raw
    temperature-1 log-prob the loss computes, not log 1 = 0 for a greedy pick."""
    from thyme.config import AgentConfig
    from thyme.loop import _choose_call
    from thyme.trajectory import ModelText, Trajectory

    model, processor = tiny
    opened = Trajectory(system_prompt="You are Thyme.", user_text="\nWhat is it?", image_paths=[readme_image])
    opened.segments.append(ModelText("<think>I crop it. <code>"))
    sampling, stop = _choose_call(opened, AgentConfig(sampling="ats", max_new_tokens=8), sampled=True)
    assert sampling.greedy and "</code>" in stop
    backend = PolicyBackend(model, processor, lock=threading.Lock())
    generation = backend.generate(opened.to_messages(), stop=stop, sampling=sampling)
    assert len(generation.token_ids) == 8
    want = _forward_logprobs(backend, model, 8)
    got = torch.tensor(generation.logprobs)
    assert got.max() < -0.5, "greedy code tokens reported as log 1"
    assert torch.allclose(got, want, atol=1e-4)


@pytest.mark.parametrize(
    ("answered", "truncated", "end"), [(True, False, [1]), (False, False, [0]), (False, True, [])]
)
def test_finish_ends_untruncated_trajectories_with_the_end_of_turn(tiny, readme_image, answered, truncated, end):
    """TRL's mask_truncated_completions takes a completion without <|im_end|> for a truncated one: an answer ends with
    a trained <|im_end|>, an ending the loop chose (a malformed code block) with one outside the loss, and a truncated
    trajectory with none, so that only it is masked."""
    from thyme.backends.scripted import ScriptedBackend

    model, processor = tiny
    script = ScriptedBackend(["<think>short</think> <answer>C</answer>"])
    backend = PolicyBackend(model, processor, lock=threading.Lock(), script=script)
    backend.generate(_messages(readme_image), stop=["</answer>"], sampling=SamplingParams())
    length = len(backend.tokens.completion_ids)
    tokens = backend.finish(answered=answered, truncated=truncated)
    eos = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokens.completion_ids[length:] == [eos] * len(end) and tokens.tool_mask[length:] == end
