"""Event-to-chat rendering, without a browser: what a user sees for each kind of step."""

from __future__ import annotations

import json
from pathlib import Path

import gradio as gr
import pytest

from thyme.loop import (
    AttemptFinished,
    AttemptStarted,
    CodeStarted,
    Finished,
    RolloutResult,
    SandboxFinished,
    TextGenerated,
)
from thyme.protocol import MISSING_ANSWER
from thyme.trajectory import ModelText, SandboxOutput, Trajectory
from thyme.ui import render

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = json.loads((REPO / "thyme/data/examples/readme_17127.json").read_text(encoding="utf-8"))
CROP = str(REPO / "tests/data/17127_ebd8fd46.jpg")


def _readme_trajectory(*, finished: bool = True) -> Trajectory:
    first, second = EXAMPLE["segments"]
    segments = [ModelText(first), SandboxOutput(images=[CROP], stdout=CROP + "\n")]
    if finished:
        segments.append(ModelText(second))
    return Trajectory("system", "\n" + EXAMPLE["question"], ["/in/17127.jpg"], segments, question=EXAMPLE["question"])


def _titles(messages: list[gr.ChatMessage]) -> list[str | None]:
    return [message.metadata.get("title") for message in messages]


def test_render_trajectory_readme_example_order_and_kinds():
    messages = render.render_trajectory(_readme_trajectory(), finished=True)
    assert _titles(messages) == [None, "Python code (step 1)", "Sandbox result (step 1)", None, None]
    reasoning, code, result, after, answer = messages
    assert reasoning.content.startswith("To determine the plate number of the blue car")
    assert "<think>" not in reasoning.content and "<code>" not in reasoning.content
    assert code.content == f"```python\n{EXAMPLE['code']}\n```"
    assert result.content == [{"path": CROP}]
    assert after.content.endswith("the correct answer is C. S QT 911.")
    assert answer.content == "### Answer\n\nC. S QT 911"


def test_render_trajectory_hidden_reasoning_keeps_code_results_and_answer():
    messages = render.render_trajectory(_readme_trajectory(), show_reasoning=False, finished=True)
    assert _titles(messages) == ["Python code (step 1)", "Sandbox result (step 1)", None]
    assert messages[-1].content.endswith("C. S QT 911")


def test_render_trajectory_running_code_shows_spinner_on_last_block_only():
    first = EXAMPLE["segments"][0]
    trajectory = Trajectory("s", "q", ["/in.jpg"], [ModelText(first)])
    messages = render.render_trajectory(trajectory, running_code=True)
    assert messages[-1].metadata == {"title": "Running in the sandbox (step 1)", "status": "pending"}
    done = render.render_trajectory(_readme_trajectory(), running_code=True)
    assert all(m.metadata.get("status") != "pending" for m in done)


def test_render_sandbox_error_is_marked_as_error():
    output = SandboxOutput(error="Sandbox for 17127: NameError: name 'imgg' is not defined")
    message = render.render_sandbox_output(output, 2)
    assert message.metadata == {"title": "Sandbox error (step 2)"}  # open: an error is read without a click
    assert "NameError: name 'imgg' is not defined" in message.content


def test_render_sandbox_text_result_and_empty_output():
    assert render.render_sandbox_output(SandboxOutput(text="area = 42"), 1).content == "```text\narea = 42\n```"
    empty = render.render_sandbox_output(SandboxOutput(), 1)
    assert "printed nothing" in empty.content and empty.metadata["title"] == "Sandbox result (step 1)"


def test_render_sandbox_several_images_keep_print_order():
    output = SandboxOutput(images=["/s/b.png", "/s/a.png"])
    assert render.render_sandbox_output(output, 1).content == [{"path": "/s/b.png"}, {"path": "/s/a.png"}]


def test_render_trajectory_finished_without_answer_says_so():
    trajectory = _readme_trajectory(finished=False)
    assert render.render_trajectory(trajectory, finished=False)[-1].metadata["title"] == "Sandbox result (step 1)"
    last = render.render_trajectory(trajectory, finished=True)[-1]
    assert last.content == MISSING_ANSWER and last.metadata["title"] == "No answer"


def test_render_code_containing_a_fence_stays_one_block():
    code = 'doc = """\n```python\nx\n```\n"""\nprint(doc)'
    assert render.render_code(code, 1).content == f"````python\n{code}\n````"
    assert render.fenced("a ````` b", "text") == "``````text\na ````` b\n``````"


def test_render_prose_strips_think_tags_only():
    assert render.render_prose("<think>look at <b>x</b></think>\n") == "look at <b>x</b>"


def _result(trajectory: Trajectory, answer: str | None, **kwargs) -> RolloutResult:
    return RolloutResult(
        answer=answer or MISSING_ANSWER,
        has_answer=answer is not None,
        trajectory=trajectory,
        attempts=[trajectory],
        stop_reason="answer" if answer else "eos",
        **kwargs,
    )


def test_turn_view_streams_pending_states_then_the_answer():
    first, second = EXAMPLE["segments"]
    trajectory = Trajectory("s", "q", ["/in.jpg"])
    view = render.TurnView()
    view.apply(AttemptStarted(1, False, trajectory))
    assert _titles(view.messages()) == ["The model is writing"]
    assert view.messages()[-1].metadata["status"] == "pending"

    trajectory.segments.append(ModelText(first))
    view.apply(TextGenerated(trajectory.segments[-1], 0))
    view.apply(CodeStarted(EXAMPLE["code"]))
    assert _titles(view.messages()) == [None, "Running in the sandbox (step 1)"]  # spinner on the code, no other

    output = SandboxOutput(images=[CROP])
    trajectory.segments.append(output)
    view.apply(SandboxFinished(EXAMPLE["code"], output))
    assert _titles(view.messages())[-2:] == ["Sandbox result (step 1)", "The model is writing"]

    trajectory.segments.append(ModelText(second))
    view.apply(TextGenerated(trajectory.segments[-1], 1))
    view.apply(AttemptFinished(1, "answer", trajectory))
    view.apply(Finished(_result(trajectory, "C. S QT 911")))
    assert view.finished
    assert _titles(view.messages()) == [None, "Python code (step 1)", "Sandbox result (step 1)", None, None]
    assert all(m.metadata.get("status") != "pending" for m in view.messages())


def test_turn_view_failed_attempt_then_fallback_answer():
    failed = Trajectory("s", "q", ["/in.jpg"], [ModelText("<think>I keep looking")])
    fallback = Trajectory("s", "q", ["/in.jpg"], [ModelText("It is the blue car.")])
    view = render.TurnView()
    for event in (
        AttemptStarted(1, False, failed),
        AttemptFinished(1, "eos", failed),
        AttemptStarted(0, True, fallback),
        AttemptFinished(0, "answer", fallback),
        Finished(_result(fallback, "It is the blue car.", used_fallback=True)),
    ):
        view.apply(event)
    messages = view.messages()
    assert _titles(messages) == [
        None, "Attempt 1 ended without an answer", "Asking once more with the plain fallback prompt", None, None,
    ]  # fmt: skip
    assert messages[1].content == "the model ended its turn without an `<answer>`."
    assert messages[-1].content == "### Answer\n\nIt is the blue car."  # from the result: the reply had no tags


def test_turn_view_budget_used_up_says_why_and_that_there_is_no_answer():
    trajectory = Trajectory("s", "q", ["/in.jpg"], [ModelText("<think>step")])
    view = render.TurnView()
    for event in (
        AttemptStarted(1, False, trajectory),
        AttemptFinished(1, "budget", trajectory),
        Finished(_result(trajectory, None)),
    ):
        view.apply(event)
    note, last = view.messages()[-2:]
    assert "raise 'Max generation calls'" in note.content
    assert last.content == MISSING_ANSWER and last.metadata["title"] == "No answer"


def test_turn_view_every_attempt_and_the_fallback_failed():
    attempts = [Trajectory("s", "q", ["/in.jpg"], [ModelText(f"<think>try {n}")]) for n in (1, 2, 3)]
    view = render.TurnView()
    for number, trajectory in enumerate(attempts, start=1):
        fallback = number == 3
        view.apply(AttemptStarted(0 if fallback else number, fallback, trajectory))
        view.apply(AttemptFinished(0 if fallback else number, "budget" if number < 3 else "empty", trajectory))
    view.apply(Finished(_result(attempts[-1], None, used_fallback=True)))
    assert [t for t in _titles(view.messages()) if t] == [
        "Attempt 1 ended without an answer",
        "Attempt 2 ended without an answer",
        "Asking once more with the plain fallback prompt",
        "The fallback prompt got no answer either",
        "No answer",
    ]


def test_turn_view_stopped_run_keeps_its_steps_and_drops_the_spinners():
    trajectory = Trajectory("s", "q", ["/in.jpg"], [ModelText(EXAMPLE["segments"][0])])
    view = render.TurnView()
    view.apply(AttemptStarted(1, False, trajectory))
    view.apply(CodeStarted(EXAMPLE["code"]))
    view.stop()
    messages = view.messages()
    assert _titles(messages) == [None, "Python code (step 1)", "Stopped"]
    assert all(m.metadata.get("status") != "pending" for m in messages)
    finished = render.TurnView(result=_result(trajectory, "A"))
    finished.stop()
    assert not finished.stopped  # a finished run cannot be stopped after the fact


def test_turn_view_rejects_unknown_events():
    with pytest.raises(TypeError, match="unknown loop event"):
        render.TurnView().apply(object())
