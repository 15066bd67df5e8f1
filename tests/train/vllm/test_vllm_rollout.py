"""The vLLM rollout path against the trainer's own forward: token-exact requests with images, raw log-probs.

A trajectory is built the way the loop builds it: sampled prose (T 1.0, top-p 0.9, top-k 50, repetition penalty
1.05), then a sandbox image appended INSIDE the assistant message, then a greedy code call. Every reported log-prob
must be the temperature-1 log-prob the loss computes from the same ids and pixels (the trainer's transformers
model, float32), greedy tokens included.
"""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from thyme.backends.base import FINISH_EOS, FINISH_LENGTH, FINISH_STOP, SamplingParams
from thyme.errors import BackendError
from thyme.protocol import ATS_CODE_STOP_STRINGS, ATS_PROSE_STOP_STRINGS, SANDBOX_OUTPUT_CLOSE, SANDBOX_OUTPUT_OPEN

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

PROSE = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, repetition_penalty=1.05, max_new_tokens=24, seed=3)
CODE = SamplingParams(temperature=0.0, max_new_tokens=16)


def _messages(readme_image: str) -> list[dict]:
    return [
        {"role": "system", "content": [{"type": "text", "text": "You are a helpful assistant."}]},
        {"role": "user", "content": [{"type": "image", "image": readme_image},
                                     {"type": "text", "text": "What is the plate number?"}]},
    ]  # fmt: skip


def _backend(driver, processor):
    from thyme.train.vllm_rollout import VLLMPolicyBackend

    return VLLMPolicyBackend(driver, processor, lock=threading.Lock())


def _trainer_logps(backend, model) -> torch.Tensor:
    """log_softmax of the trainer's forward over the trajectory's ids and pixels, at each completion token."""
    from thyme.train.policy import PolicyBackend

    backend._model = model  # the transformers forward on exactly the ids and pixels the requests carried
    inputs = PolicyBackend._model_inputs(backend)
    tokens = backend.tokens
    with torch.no_grad():
        logits = model(**inputs).logits[0].float()
    start = len(tokens.prompt_ids)
    logps = torch.log_softmax(logits[start - 1 : -1], dim=-1)
    return logps.gather(1, torch.tensor(tokens.completion_ids)[:, None])[:, 0]


@pytest.fixture(scope="module")
def trajectory(vllm_driver, vllm_processor, readme_image, tmp_path_factory):
    """Prose sampled on vLLM, a sandbox crop appended in the assistant turn, then a greedy code call."""
    backend = _backend(vllm_driver, vllm_processor)
    messages = _messages(readme_image)
    prose = backend.generate(messages, stop=ATS_PROSE_STOP_STRINGS, sampling=PROSE)
    crop = tmp_path_factory.mktemp("crop") / "crop.png"
    Image.open(readme_image).convert("RGB").crop((700, 1500, 1100, 1800)).save(crop)
    assistant = [
        {"type": "text", "text": prose.text + SANDBOX_OUTPUT_OPEN},
        {"type": "image", "image": str(crop)},
        {"type": "text", "text": SANDBOX_OUTPUT_CLOSE + "\n"},
    ]
    code = backend.generate([*messages, {"role": "assistant", "content": assistant}], stop=ATS_CODE_STOP_STRINGS,
                            sampling=CODE)  # fmt: skip
    return backend, prose, code


def test_every_sampled_token_reports_the_losss_temperature_1_logprob(trajectory, hf_policy):
    backend, prose, code = trajectory
    tokens = backend.tokens
    assert len(tokens.images) == 2, "the input image and the sandbox crop"
    assert prose.token_ids and code.token_ids
    reference = _trainer_logps(backend, hf_policy)
    sampled = [i for i, mask in enumerate(tokens.tool_mask) if mask]
    assert len(sampled) == len(prose.token_ids) + len(code.token_ids)
    reported = torch.tensor([tokens.logprobs[i] for i in sampled])
    assert torch.allclose(reported, reference[sampled], atol=2e-4), (reported - reference[sampled]).abs().max()
    # The greedy code call sits AFTER the crop: its log-probs are right only if vLLM saw the crop's pixels at the
    # crop's token positions, and they are the raw ones (not 0.0 = "greedy prob 1").
    assert all(lp < -1e-3 for lp in code.logprobs)


def test_sandbox_tokens_are_not_sampled_and_carry_no_logprob(trajectory):
    backend, prose, code = trajectory
    tokens = backend.tokens
    appended = [i for i, mask in enumerate(tokens.tool_mask) if not mask]
    assert appended, "the sandbox output tokens"
    assert all(tokens.logprobs[i] is None for i in appended)
    pad = backend._pad_id
    assert sum(1 for i in appended if tokens.completion_ids[i] == pad) > 0, "the crop's image tokens"


def test_finish_reasons_follow_the_engine(trajectory):
    _, prose, code = trajectory
    assert prose.finish_reason in (FINISH_STOP, FINISH_EOS, FINISH_LENGTH)
    if prose.finish_reason == FINISH_LENGTH:
        assert len(prose.token_ids) == PROSE.max_new_tokens


def test_a_stop_string_ends_the_text_and_keeps_the_stopping_token(vllm_driver, vllm_processor, readme_image):
    """Scripted ids through the scoring path, then a greedy call whose stop is the first thing it writes."""
    backend = _backend(vllm_driver, vllm_processor)
    messages = _messages(readme_image)
    first = backend.generate(messages, stop=(), sampling=SamplingParams(temperature=0.0, max_new_tokens=6))
    # Whatever the tiny model writes greedily, its second token's text is a stop string for a repeat of the call.
    text = vllm_processor.tokenizer.decode(first.token_ids[:2], skip_special_tokens=True)
    again = _backend(vllm_driver, vllm_processor)
    repeat = again.generate(messages, stop=(text,), sampling=SamplingParams(temperature=0.0, max_new_tokens=6))
    assert repeat.finish_reason == FINISH_STOP
    assert repeat.text.endswith(text) and len(repeat.token_ids) <= 2
    assert repeat.token_ids == first.token_ids[: len(repeat.token_ids)]


def test_the_engine_batches_concurrent_calls(vllm_driver, vllm_processor, readme_image):
    """Four rollout threads: their requests are in the engine together, not one after another."""
    seen: list[int] = []
    step = vllm_driver._engine.step

    def counting_step():
        seen.append(len(vllm_driver._running))
        return step()

    vllm_driver._engine.step = counting_step
    try:
        backends = [_backend(vllm_driver, vllm_processor) for _ in range(4)]
        sampling = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, max_new_tokens=16)
        threads = [threading.Thread(target=b.generate, args=(_messages(readme_image),),
                                    kwargs={"stop": (), "sampling": sampling}) for b in backends]  # fmt: skip
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    finally:
        vllm_driver._engine.step = step
    assert all(b.tokens.completion_ids for b in backends)
    assert max(seen) == 4, seen


def test_images_resized_differently_from_the_trainer_fail_clearly(vllm_driver, tiny_vllm_model_dir, readme_image):
    """A trainer processor with other pixel limits than the engine's: the request fails and names the fix."""
    from thyme.backends.processor import load_processor

    processor = load_processor(tiny_vllm_model_dir, 28 * 28, 128 * 128)
    backend = _backend(vllm_driver, processor)
    with pytest.raises(BackendError, match="min_pixels/max_pixels"):
        backend.generate(_messages(readme_image), stop=(), sampling=CODE)


def test_sampling_params_of_prose_and_code_calls(vllm_processor):
    from thyme.train.policy import _SUPPRESSED_TOKENS
    from thyme.train.vllm_rollout import vllm_sampling_params

    suppress = vllm_processor.tokenizer.convert_tokens_to_ids(list(_SUPPRESSED_TOKENS))
    prose = vllm_sampling_params(PROSE, ATS_PROSE_STOP_STRINGS, 24, suppress)
    assert (prose.temperature, prose.top_p, prose.top_k, prose.repetition_penalty) == (1.0, 0.9, 50, 1.05)
    assert prose.stop == list(ATS_PROSE_STOP_STRINGS) and prose.include_stop_str_in_output
    assert prose.logprobs == 0 and prose.max_tokens == 24 and prose.seed == 3
    code = vllm_sampling_params(CODE, ATS_CODE_STOP_STRINGS, 16, suppress)
    assert code.temperature == 0.0 and code.stop == ["</code>"] and code.repetition_penalty == 1.0
    for params in (prose, code):
        assert set(params.logit_bias) == set(suppress) and set(params.logit_bias.values()) == {-100.0}


def test_driver_survives_a_refused_request(vllm_driver, vllm_processor):
    """A request vLLM refuses (longer than the model's context) fails alone; the next one still runs."""
    from vllm import SamplingParams as VLLMSamplingParams

    with pytest.raises(Exception, match="(?i)longer than|maximum|too long"):
        vllm_driver.generate({"prompt_token_ids": [100] * 5000}, VLLMSamplingParams(max_tokens=2))
    start = time.perf_counter()
    output = vllm_driver.generate({"prompt_token_ids": [100, 101, 102]}, VLLMSamplingParams(max_tokens=2))
    assert len(output.outputs[0].token_ids) == 2 and time.perf_counter() - start < 120


class _OvershootingEngine:
    """The real driver, except that the first sampling request returns ``ids`` as if the engine sampled them (the
    tiny model never writes ``</code>``): the prompt-log-prob requests that score replacement tokens stay real."""

    def __init__(self, driver, ids: list[int], logprobs: list[float]):
        self._driver, self._ids, self._logprobs = driver, ids, logprobs

    def generate(self, prompt, params):
        if params.prompt_logprobs is not None:
            return self._driver.generate(prompt, params)
        real = self._driver.generate(prompt, params)  # for the expanded prompt ids vLLM reports
        entries = [{token: SimpleNamespace(logprob=lp)} for token, lp in zip(self._ids, self._logprobs, strict=True)]
        completion = SimpleNamespace(token_ids=self._ids, logprobs=entries, finish_reason="stop",
                                     stop_reason="</code>", text=None)  # fmt: skip
        return SimpleNamespace(prompt_token_ids=real.prompt_token_ids, outputs=[completion])


def test_a_sampled_token_past_the_stop_is_replaced_as_the_transformers_path_does(
    vllm_driver, vllm_processor, readme_image, hf_policy
):
    """The engine samples `>\\n` to close `</code>`; the loop cuts after `>` and appends `<sandbox_output>`. The kept
    ids must be the conversation's own tokenisation (`><`, ...), as PolicyBackend keeps them, and the `><` token the
    policy wrote is scored by the engine at temperature 1: the loss forward's log-prob at that position."""
    from thyme.train.vllm_rollout import VLLMPolicyBackend

    tokenizer = vllm_processor.tokenizer
    script_ids = tokenizer("x = 1\n</code", add_special_tokens=False)["input_ids"]
    overshoot, merged = tokenizer.convert_tokens_to_ids([">Ċ", "><"])  # `>\n` in byte-level BPE, and `><`
    ids = [*script_ids, overshoot]
    engine = _OvershootingEngine(vllm_driver, ids, [-1.0] * len(ids))
    backend = VLLMPolicyBackend(engine, vllm_processor, lock=threading.Lock())
    opened = {"role": "assistant", "content": [{"type": "text", "text": "<code>\n"}]}
    generation = backend.generate([*_messages(readme_image), opened], stop=ATS_CODE_STOP_STRINGS, sampling=CODE)
    assert generation.finish_reason == FINISH_STOP and generation.text == "x = 1\n</code>"
    text = "<code>\n" + generation.text + SANDBOX_OUTPUT_OPEN + "done" + SANDBOX_OUTPUT_CLOSE
    following = {"role": "assistant", "content": [{"type": "text", "text": text}]}
    backend._append_loop_text([*_messages(readme_image), following])
    tokens = backend.tokens
    assert tokens.completion_ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    position = tokens.completion_ids.index(merged)
    assert tokens.tool_mask[position] == 1
    reference = _trainer_logps(backend, hf_policy)
    assert tokens.logprobs[position] == pytest.approx(reference[position].item(), abs=2e-4)
