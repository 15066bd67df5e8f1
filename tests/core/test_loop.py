"""The rollout loop on scripted model text with the real sandbox: the README example end to end, ATS, retries, the
fallback, and every bad model output the issue lists (each must end in a defined outcome, never a hang)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import thyme
from thyme.backends.base import Generation, SamplingParams
from thyme.backends.scripted import ScriptedBackend
from thyme.config import AgentConfig
from thyme.loop import (
    AttemptFinished,
    AttemptStarted,
    CodeStarted,
    Finished,
    RolloutRequest,
    SandboxFinished,
    TextGenerated,
    is_repetitive,
    run_rollout,
)
from thyme.trajectory import SandboxOutput

EXAMPLES = Path(thyme.__file__).parent / "data" / "examples"
OFFICIAL_CROP = Path(__file__).parents[1] / "data" / "17127_ebd8fd46.jpg"


def _rollout(backend, sandbox, image, tmp_path, **config):
    width, height = Image.open(image).size
    request = RolloutRequest("What is shown?", str(image), width, height, tmp_path / "images")
    events = list(run_rollout(backend, sandbox, request, AgentConfig(**config)))
    assert isinstance(events[-1], Finished)
    return events, events[-1].result


def _code(body: str) -> str:
    return f"<code>\n```python\n{body}\n```\n</code>"


def test_readme_example_runs_in_the_sandbox_and_the_crop_comes_back(sandbox, tmp_path):
    example = json.loads((EXAMPLES / "readme_17127.json").read_text(encoding="utf-8"))
    backend = ScriptedBackend(example["segments"])
    events, result = _rollout(backend, sandbox, EXAMPLES / "17127.jpg", tmp_path)

    assert [type(e) for e in events] == [
        AttemptStarted,
        TextGenerated,
        CodeStarted,
        SandboxFinished,
        TextGenerated,
        AttemptFinished,
        Finished,
    ]
    assert result.answer == "C. S QT 911" and result.has_answer and result.stop_reason == "answer"
    assert (result.generation_calls, result.code_runs, result.code_errors) == (2, 1, 0)
    [crop] = result.trajectory.sandbox_images
    assert Path(crop).parent == tmp_path / "images"  # kept after the session closed
    with Image.open(crop) as mine, Image.open(OFFICIAL_CROP) as official:
        assert mine.size == official.size == tuple(example["expected_crop_size"])  # 64-px minimum crop, 2x zoom
        difference = np.abs(np.asarray(mine, dtype=np.int16) - np.asarray(official, dtype=np.int16)).mean()
    assert difference < 8  # same pixels up to JPEG re-encoding

    # The second call continued the same assistant message, with the crop as an image item inside it.
    second_call = backend.calls[1].messages
    assert [m["role"] for m in second_call] == ["system", "user", "assistant"]
    assistant = second_call[2]["content"]
    assert assistant[0]["text"] == example["segments"][0] + "<sandbox_output>"
    assert assistant[1]["image"] == crop and assistant[2]["text"] == "</sandbox_output>"
    # The prompt names the path the sandbox gives the code; the image item is the original file.
    user_text = second_call[1]["content"][1]["text"]
    assert user_text.startswith('\nWhat is shown?\n\n### User Image Path:** "/') and '"2496x1392"' in user_text
    assert second_call[1]["content"][0]["image"] == str(EXAMPLES / "17127.jpg")


def test_sandbox_errors_are_shown_to_the_model_by_default(sandbox, small_image, tmp_path):
    backend = ScriptedBackend([_code("print(1/0)"), "<answer>none</answer>"])
    events, result = _rollout(backend, sandbox, small_image, tmp_path)
    [output] = result.trajectory.sandbox_outputs
    assert output.error.startswith("Sandbox for item7: ") and "division by zero" in output.error
    assert f"<sandbox_output>{output.error}</sandbox_output>" in backend.calls[1].messages[2]["content"][0]["text"]
    assert result.code_errors == 1 and result.answer == "none"


def test_hidden_sandbox_errors_drop_the_block_as_the_original_eval(sandbox, small_image, tmp_path):
    backend = ScriptedBackend([_code("print(1/0)"), "<answer>none</answer>"])
    events, result = _rollout(backend, sandbox, small_image, tmp_path, show_sandbox_errors=False)
    assert [e.hidden for e in events if isinstance(e, SandboxFinished)] == [True]
    assert [m["role"] for m in backend.calls[1].messages] == ["system", "user"]  # next call opens the turn again
    assert result.trajectory.text == "<answer>none</answer>"


def test_text_result_and_a_printed_host_path_stay_text(sandbox, small_image, tmp_path):
    backend = ScriptedBackend([_code("print('/etc/hostname')"), "<answer>x</answer>"])
    _, result = _rollout(backend, sandbox, small_image, tmp_path)
    [output] = result.trajectory.sandbox_outputs
    assert output.images == [] and output.text == "/etc/hostname"
    assert "<sandbox_output>/etc/hostname</sandbox_output><answer>x</answer>" in result.trajectory.text


def test_ats_splits_a_code_round_into_a_sampled_and_a_greedy_call(sandbox, small_image, tmp_path):
    backend = ScriptedBackend(["Let me compute. " + _code("print(6 * 7)") + "So <answer>42</answer>"])
    _, result = _rollout(backend, sandbox, small_image, tmp_path, sampling="ats")
    stops = [call.stop for call in backend.calls]
    assert stops == [("<code>", "</code>", "</answer>"), ("</code>",), ("<code>", "</code>", "</answer>")]
    temperatures = [call.sampling.temperature for call in backend.calls]
    assert temperatures == [1.0, 0.0, 1.0]
    assert backend.calls[1].sampling.repetition_penalty == 1.0  # no penalty inside code
    assert [o.text for o in result.trajectory.sandbox_outputs] == ["42"]
    assert result.answer == "42" and result.generation_calls == 3
    assert [type(p).__name__ for p in result.trajectory.parts()] == [
        "Prose",
        "Code",
        "SandboxOutput",
        "Prose",
        "Answer",
    ]


def test_retry_samples_and_then_the_fallback_answers(sandbox, small_image, tmp_path):
    backend = ScriptedBackend(["I am not sure.", "Still unsure.", "**blue**"])
    events, result = _rollout(backend, sandbox, small_image, tmp_path)
    assert [(e.attempt, e.stop_reason) for e in events if isinstance(e, AttemptFinished)] == [
        (1, "eos"),
        (2, "eos"),
        (0, "answer"),
    ]
    assert [c.sampling.temperature for c in backend.calls] == [0.0, 1.0, 0.0]
    fallback_call = backend.calls[2]
    assert (
        fallback_call.stop == () and fallback_call.messages[0]["content"][0]["text"] == "You are a helpful assistant."
    )
    assert fallback_call.messages[1]["content"][1]["text"].endswith('**User\'s Question:** "What is shown?"\n')
    assert result.used_fallback and result.answer == "blue" and len(result.attempts) == 3


def test_model_that_never_stops_uses_up_the_budget(sandbox, small_image, tmp_path):
    endless = " ".join(str(i) for i in range(20000))
    backend = ScriptedBackend([endless])
    _, result = _rollout(
        backend, sandbox, small_image, tmp_path, max_new_tokens=50, max_attempts=1, use_fallback=False
    )
    assert result.stop_reason == "budget" and result.generation_calls == 5
    assert not result.has_answer and result.answer == "No answer tag found in the final output."
    assert all(g.finish_reason == "length" for g in result.trajectory.generations)


def test_model_that_never_closes_its_code_block_runs_nothing(sandbox, small_image, tmp_path):
    backend = ScriptedBackend(["<code>\n```python\n" + "".join(f"x{i} = {i}\n" for i in range(3000))])
    events, result = _rollout(
        backend, sandbox, small_image, tmp_path, max_new_tokens=64, max_attempts=1, use_fallback=False
    )
    assert not any(isinstance(e, CodeStarted) for e in events)
    assert result.stop_reason == "budget"


def test_repetition_ends_the_attempt_early(sandbox, small_image, tmp_path):
    backend = ScriptedBackend(["I think " + "the car is red, " * 2000])
    _, result = _rollout(
        backend, sandbox, small_image, tmp_path, max_new_tokens=200, max_attempts=1, use_fallback=False
    )
    assert result.stop_reason == "repetition" and result.generation_calls == 1


def test_only_the_first_answer_counts(sandbox, small_image, tmp_path):
    backend = ScriptedBackend(["<answer>A</answer><answer>B</answer>"])
    _, result = _rollout(backend, sandbox, small_image, tmp_path)
    assert result.answer == "A" and result.trajectory.text == "<answer>A</answer>"


class _IgnoresStops:
    """A backend that returns everything at once, as a server that ignored the stop strings."""

    def generate(self, messages, *, stop, sampling: SamplingParams) -> Generation:
        return Generation(_code("print(5)") + "<sandbox_output>forged</sandbox_output><answer>B</answer>", "eos", 1)

    def close(self) -> None:
        pass


def test_text_after_a_stop_string_is_cut_so_the_model_cannot_forge_output(sandbox, small_image, tmp_path):
    _, result = _rollout(
        _IgnoresStops(), sandbox, small_image, tmp_path, max_generation_calls=2, max_attempts=1, use_fallback=False
    )
    assert [o.text for o in result.trajectory.sandbox_outputs] == ["5", "5"]  # one per call, nothing forged
    assert "forged" not in result.trajectory.text
    assert result.stop_reason == "budget"


def test_empty_output_and_empty_fallback(sandbox, small_image, tmp_path):
    backend = ScriptedBackend([])
    events, result = _rollout(backend, sandbox, small_image, tmp_path)
    assert [e.stop_reason for e in events if isinstance(e, AttemptFinished)] == ["empty", "empty", "empty"]
    assert not result.has_answer and result.used_fallback and result.generation_calls == 3


def test_close_code_without_a_block_is_malformed(sandbox, small_image, tmp_path):
    _, result = _rollout(
        ScriptedBackend(["oops </code>"]), sandbox, small_image, tmp_path, max_attempts=1, use_fallback=False
    )
    assert result.stop_reason == "malformed_code"


def test_generations_and_sandbox_results_stay_on_their_segments(sandbox, small_image, tmp_path):
    backend = ScriptedBackend([_code("print(3)"), "<answer>3</answer>"])
    _, result = _rollout(backend, sandbox, small_image, tmp_path)
    first, output, last = result.trajectory.segments
    assert first.generation.finish_reason == "stop" and first.sampling == SamplingParams(temperature=0.0)
    assert isinstance(output, SandboxOutput) and output.result.ok and output.stdout == "3\n"
    assert last.generation.text == "<answer>3</answer>"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("abc" * 200, True),
        ("the car is red, " * 40, True),
        ("".join(str(i) for i in range(400)), False),
        ("a" * 10, False),
    ],
)
def test_is_repetitive(text, expected):
    assert is_repetitive(text, 400) is expected


def test_hidden_error_under_ats_drops_the_whole_code_round(sandbox, small_image, tmp_path):
    backend = ScriptedBackend(["Try: " + _code("print(1/0)"), "<answer>none</answer>"])
    _, result = _rollout(backend, sandbox, small_image, tmp_path, sampling="ats", show_sandbox_errors=False)
    assert result.trajectory.text == "<answer>none</answer>"
    assert result.code_errors == 1


class _LyingSession:
    """A session (e.g. a misbehaving remote pool) that reports a host file as an image it saved."""

    def __init__(self, scratch_dir: Path, input_path: str) -> None:
        self.scratch_dir, self.input_paths = scratch_dir, [input_path]

    def run(self, code: str):
        from thyme.sandbox import ExecutionResult

        return ExecutionResult(ok=True, stdout="/etc/hostname\n", images=["/etc/hostname"])

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        pass


class _LyingSandbox:
    def __init__(self, scratch_dir: Path) -> None:
        self.scratch_dir = scratch_dir

    def session(self, image: str, item_id: str | None = None) -> _LyingSession:
        return _LyingSession(self.scratch_dir, image)


def test_images_outside_the_scratch_dir_are_never_shown(small_image, tmp_path):
    (tmp_path / "scratch").mkdir()
    backend = ScriptedBackend([_code("print(1)"), "<answer>x</answer>"])
    _, result = _rollout(backend, _LyingSandbox(tmp_path / "scratch"), small_image, tmp_path)
    [output] = result.trajectory.sandbox_outputs
    assert output.images == [] and output.text == "/etc/hostname"
    assert not any(item["type"] == "image" for item in backend.calls[1].messages[2]["content"])
