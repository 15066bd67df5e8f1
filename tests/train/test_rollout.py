"""The batch adapter: per-sample failures, rollout metrics, and the fail-fast sandbox error-rate check."""

from __future__ import annotations

import threading

import pytest

from thyme.errors import BackendError
from thyme.train.rollout import (
    STOP_FAILED,
    BatchStats,
    RolloutImagesDir,
    SandboxErrorRateError,
    SandboxHealth,
    run_batch,
)
from thyme.trajectory import SandboxOutput, Trajectory

pytestmark = pytest.mark.slow

BROKEN_CODE_SCRIPT = [
    "<think>Crop it.\n<code>\n```python\nprint(undefined_name)\n```\n</code>",
    "The code failed.</think>\n<answer>C</answer>",
]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForImageTextToText

    from thyme.backends.processor import load_processor

    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir).eval()
    return model, load_processor(tiny_model_dir, 28 * 28, 256 * 256)


class _BrokenBackend:
    """Stands for a backend whose server went away mid-batch."""

    tokens = None

    def __init__(self, inner):
        self._inner = inner

    def generate(self, messages, *, stop, sampling):
        raise BackendError("connection to the generation server was lost")

    def start(self, messages):
        self._inner.start(messages)
        self.tokens = self._inner.tokens

    def failed_sample(self):
        return self._inner.failed_sample()


def _requests(readme_example, readme_image, images_dir, count):
    from thyme.loop import RolloutRequest

    return [
        RolloutRequest(readme_example["question"], readme_image, 2496, 1392, images_dir.for_sample(i), "17127")
        for i in range(count)
    ]


def test_run_batch_keeps_a_failure_to_its_sample(tiny, sandbox, readme_example, readme_image, readme_script):
    from thyme.backends.scripted import ScriptedBackend
    from thyme.config import AgentConfig
    from thyme.train.policy import PolicyBackend

    model, processor = tiny
    lock = threading.Lock()
    config = AgentConfig(sampling="ats", max_attempts=1, use_fallback=False, max_new_tokens=1024)

    def make_backend(index):
        policy = PolicyBackend(model, processor, lock=lock, script=ScriptedBackend(readme_script))
        return _BrokenBackend(policy) if index == 1 else policy

    with RolloutImagesDir() as images_dir:
        samples = run_batch(_requests(readme_example, readme_image, images_dir, 3), make_backend, sandbox, config,
                            workers=2)  # fmt: skip
    assert [s.stop_reason for s in samples] == ["answer", STOP_FAILED, "answer"]
    failed = samples[1]
    assert failed.error == "BackendError: connection to the generation server was lost"
    eos = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert failed.tokens.completion_ids == [eos] and failed.tokens.tool_mask == [0]
    # It failed before its first call, so its prompt is rendered from the request (no session path yet).
    prompt = processor.tokenizer.decode(failed.tokens.prompt_ids)
    assert readme_example["question"] in prompt and f'Path:** "{readme_image}"' in prompt
    assert prompt.count("<|image_pad|>") == samples[0].tokens.prompt_ids.count(processor.image_token_id)
    assert len(failed.tokens.images) == 1
    stats = BatchStats.of(samples)
    assert stats.failed == pytest.approx(1 / 3) and stats.answered == pytest.approx(2 / 3)
    assert stats.code_blocks_per_trajectory == pytest.approx(2 / 3) and stats.sandbox_error_rate == 0.0
    assert all(s.sandbox_wait_s > 0 for s in (samples[0], samples[2]))


def test_sandbox_outcomes_counts_blocks_and_distinct_errors():
    from thyme.train.policy import TrajectoryTokens
    from thyme.train.rollout import RolloutSample, sandbox_outcomes

    outputs = [SandboxOutput(error="Sandbox for 1: NameError"), SandboxOutput(text="ok"),
               SandboxOutput(error="Sandbox for 1: NameError"), SandboxOutput(images=["/a.png"])]  # fmt: skip
    sample = RolloutSample(TrajectoryTokens([1]), Trajectory("sys", "q", ["/x.jpg"], outputs), "answer")
    failed = RolloutSample(TrajectoryTokens([1]), None, STOP_FAILED)
    assert sandbox_outcomes([sample, failed]) == (2, 4, ["Sandbox for 1: NameError"])


def test_sandbox_health_waits_for_enough_blocks_then_fails_fast():
    health = SandboxHealth(max_rate=0.5, window=4, min_blocks=3)
    health.record(1, 1, ["Sandbox for 1: NameError"])  # 100%, but 1 block is too few to judge
    health.record(0, 3)  # 1 of 4
    health.record(2, 2, ["Sandbox for 2: NameError"])  # the oldest batch leaves (4 newer blocks remain): 2 of 5
    with pytest.raises(SandboxErrorRateError) as info:
        health.record(2, 3, ["Sandbox for 4: ImportError"])  # the 3 clean blocks leave: 4 of 5
    message = str(info.value)
    assert message.startswith("4 of the last 5 code blocks failed in the sandbox (80% > max_sandbox_error_rate 50%)")
    assert "recent errors: Sandbox for 4: ImportError." in message


def test_trainer_stops_when_the_sandbox_error_rate_is_too_high(make_trainer, tmp_path):
    import json

    script = tmp_path / "broken.json"
    script.write_text(json.dumps({"segments": BROKEN_CODE_SCRIPT}), encoding="utf-8")
    trainer = make_trainer(script=script, sandbox_error_min_blocks=2, max_sandbox_error_rate=0.5)
    with pytest.raises(SandboxErrorRateError, match=r"2 of the last 2 code blocks failed .*Sandbox for 17127"):
        trainer.train()
    assert trainer.state.global_step == 0
