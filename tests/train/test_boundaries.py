"""The trained sequence is the seen sequence: at every stop boundary the RL sample's ids are those inference and SFT
give the same conversation, including where a byte-pair token spans the stop string and what follows it."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from thyme.backends.base import SamplingParams
from thyme.protocol import ATS_CODE_STOP_STRINGS
from thyme.train.policy import PolicyBackend

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "train" / "examples" / "data"


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForImageTextToText

    from thyme.backends.processor import load_processor

    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir).eval()
    return model, load_processor(tiny_model_dir, 28 * 28, 256 * 256)


def _pieces(tokenizer, text: str) -> list[str]:
    return [tokenizer.decode([token]) for token in tokenizer(text, add_special_tokens=False)["input_ids"]]


def test_tiny_tokenizer_merges_across_stop_boundaries_as_qwen2_does(tiny):
    tokenizer = tiny[1].tokenizer
    assert _pieces(tokenizer, "</code><sandbox_output>")[:3] == ["</", "code", "><"]
    assert _pieces(tokenizer, "<code>\n```python")[:2] == ["<code", ">\n"]
    assert _pieces(tokenizer, "</code>\n")[-1] == ">\n"


def test_rl_sft_and_inference_give_the_same_ids_for_one_trajectory(tiny, tmp_path, sandbox):
    """The shipped crop trajectory through the loop (ATS: prose to `<code>`, greedy code to `</code>`, the sandbox's
    crop, then the answer): the RL sample equals the whole-conversation tokenisation of inference and of SFT."""
    from thyme.backends.local import TransformersBackend
    from thyme.backends.scripted import ScriptedBackend
    from thyme.config import AgentConfig
    from thyme.loop import STOP_ANSWER, RolloutRequest
    from thyme.train.rollout import run_one
    from thyme.train.sft_collator import ThymeSFTCollator

    model, processor = tiny
    segments = json.loads((DATA / "rl_script.json").read_text(encoding="utf-8"))["trajectories"]["shapes_red"][0]
    backend = PolicyBackend(model, processor, lock=threading.Lock(), script=ScriptedBackend(segments))
    request = RolloutRequest("Which color?", str(DATA / "shapes_red.png"), 224, 160, tmp_path / "images")
    config = AgentConfig(sampling="ats", max_generation_calls=5, min_pixels=28 * 28, max_pixels=256 * 256)
    sample = run_one(request, backend, sandbox, config)
    assert sample.stop_reason == STOP_ANSWER and sample.code_runs == 1 and len(sample.tokens.images) == 2
    rl_ids = sample.tokens.prompt_ids + sample.tokens.completion_ids
    tokenizer = processor.tokenizer
    assert tokenizer.decode(sample.tokens.completion_ids).count("><sandbox") == 1

    messages = sample.trajectory.to_messages()
    inference = TransformersBackend(model, processor).prepare_inputs(messages)["input_ids"][0].tolist()
    assert rl_ids[:-1] == inference and rl_ids[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")

    crop = sample.trajectory.sandbox_outputs[0].images[0]
    row = {"image": [request.image_path, crop], "question": "<image>\nWhich color?", "response": _sft_response(sample)}
    sft_ids = ThymeSFTCollator(processor)([row])["input_ids"][0].tolist()
    completion = sample.tokens.completion_ids
    assert sft_ids[-len(completion) - 1 : -1] == completion  # the SFT text ends with the template's "\n"


def _sft_response(sample) -> str:
    """The trajectory's assistant text in the SFT form (each sandbox image as the `<image>` placeholder)."""
    from thyme.protocol import IMAGE_PLACEHOLDER

    parts = []
    for item in sample.trajectory.to_messages()[-1]["content"]:
        parts.append(IMAGE_PLACEHOLDER if item["type"] == "image" else item["text"])
    return "".join(parts)


def test_a_sampled_token_that_runs_past_the_stop_is_replaced_by_what_the_conversation_holds(tiny, readme_image):
    """The policy samples `>\\n` to close `</code>`: the loop cuts the text after `>` and appends `<sandbox_output>`.
    The kept ids must be the conversation's (`><`, `sandbox`, ...), and the `><` token is scored at temperature 1
    from the logits of the step that sampled `>\\n`."""
    model, processor = tiny
    tokenizer = processor.tokenizer
    script_ids = tokenizer("x = 1\n</code", add_special_tokens=False)["input_ids"]
    overshoot = tokenizer.convert_tokens_to_ids(">Ċ")  # `>\n` in byte-level BPE
    merged = tokenizer.convert_tokens_to_ids("><")
    logits = torch.randn(len(script_ids) + 1, len(tokenizer))

    backend = PolicyBackend(model, processor, lock=threading.Lock())

    def fake_generate(input_ids, **kwargs):
        new = torch.tensor([[*script_ids, overshoot]])
        return SimpleNamespace(sequences=torch.cat([input_ids, new], dim=1), logits=list(logits[:, None, :]))

    model_generate, model.generate = model.generate, fake_generate
    try:
        system = {"role": "system", "content": [{"type": "text", "text": "S"}]}
        user = {"role": "user", "content": [{"type": "image", "image": readme_image}, {"type": "text", "text": "Q"}]}
        opened = {"role": "assistant", "content": [{"type": "text", "text": "<code>\n"}]}
        sampling = SamplingParams(temperature=0.0, max_new_tokens=32)
        generation = backend.generate([system, user, opened], stop=ATS_CODE_STOP_STRINGS, sampling=sampling)
    finally:
        model.generate = model_generate
    assert generation.text == "x = 1\n</code>"
    text = "<code>\n" + generation.text + "<sandbox_output>done</sandbox_output>"
    following = {"role": "assistant", "content": [{"type": "text", "text": text}]}
    backend._append_loop_text([system, user, following])
    tokens = backend.tokens
    assert tokenizer.decode(tokens.completion_ids) == text
    assert tokens.completion_ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    position = tokens.completion_ids.index(merged)
    assert tokens.tool_mask[position] == 1
    want = torch.log_softmax(logits[len(script_ids)], dim=-1)[merged].item()
    assert tokens.logprobs[position] == pytest.approx(want, abs=1e-5)
