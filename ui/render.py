"""Turns a Thyme trajectory into chat messages for Gradio's ``Chatbot`` (messages format). Pure: no I/O, no state.

One assistant trajectory becomes several chat messages so that each step can be folded on its own, the way Gradio's
tool-use demos show tool calls (``metadata={"title": ...}`` makes a collapsible "thought"):

- reasoning prose: a plain assistant message (dropped when the user hides reasoning);
- each code block: a collapsible message holding the code as a highlighted ``python`` fence;
- each sandbox result: a collapsible message holding the crops as images, or the text result, or the error (titled as
  an error so a failing step is visible at a glance);
- the final answer: its own message, set apart by a heading.

Titles are plain text: emoji render as empty boxes where the browser has no emoji font (headless Chromium here).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import gradio as gr

from thyme.loop import (
    STOP_BUDGET,
    STOP_CONTEXT,
    STOP_EMPTY,
    STOP_EOS,
    STOP_MALFORMED_CODE,
    STOP_REPETITION,
    AttemptFinished,
    AttemptStarted,
    CodeStarted,
    Event,
    Finished,
    RolloutResult,
    SandboxFinished,
    TextGenerated,
)
from thyme.protocol import ANSWER_OPEN, CODE_CLOSE, CODE_OPEN, MISSING_ANSWER, THINK_CLOSE, THINK_OPEN
from thyme.trajectory import Answer, Code, Prose, SandboxOutput, Trajectory

CODE_TITLE = "Python code (step {step})"
RUNNING_TITLE = "Running in the sandbox (step {step})"
RESULT_TITLE = "Sandbox result (step {step})"
ERROR_TITLE = "Sandbox error (step {step})"
ANSWER_HEADING = "### Answer"
NO_ANSWER_TITLE = "No answer"
PROBLEM_TITLE = "Error"
THINKING_TITLE = "The model is writing"
THINKING_TEXT = "Waiting for the backend to return the next piece of the reasoning."
RETRY_TITLE = "Attempt {attempt} ended without an answer"
FALLBACK_FAILED_TITLE = "The fallback prompt got no answer either"
STOPPED_TITLE = "Stopped"
STOPPED_TEXT = "You stopped this run; the model did not finish."
FALLBACK_TITLE = "Asking once more with the plain fallback prompt"
FALLBACK_TEXT = "No attempt ended with an answer, so the model is asked once more to answer directly, without code."
# Why an attempt ended without an answer, in the user's words (the loop's STOP_* reasons); tags in backticks, since
# the chat's Markdown would drop them as unknown HTML.
STOP_REASON_TEXT = {
    STOP_EOS: f"the model ended its turn without an `{ANSWER_OPEN}`.",
    STOP_EMPTY: "the model returned no text.",
    STOP_BUDGET: "the budget of generation calls was used up (raise 'Max generation calls' in the settings).",
    STOP_REPETITION: "the model kept repeating itself until the token limit.",
    STOP_CONTEXT: "the model's context window is full (a shorter question, fewer calls or smaller images help).",
    STOP_MALFORMED_CODE: f"the model wrote `{CODE_CLOSE}` without a complete `{CODE_OPEN}` block before it.",
}
# Gradio's MetadataDict status "pending" shows a spinner on the title. No status leaves the message open: errors and
# notes must be readable without a click ("done" would fold them away).
_PENDING = "pending"


def render_prose(text: str) -> str:
    """Returns reasoning prose as shown to the user: the ``<think>`` tags removed, surrounding blank space trimmed.

    The tags are protocol, not content, and Gradio's Markdown would otherwise pass them to the page as unknown HTML.
    """
    return text.replace(THINK_OPEN, "").replace(THINK_CLOSE, "").strip()


def fenced(text: str, language: str) -> str:
    """A Markdown code block around ``text``, its fence longer than any backtick run inside (CommonMark's rule), so
    model code or output that itself contains a fence cannot end the block early."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{language}\n{text}\n{fence}"


def render_code(code: str, step: int, *, running: bool = False) -> gr.ChatMessage:
    """A collapsible message showing one code block as highlighted Python.

    Args:
        code (`str`): the body of the ``<code>`` block (fence removed).
        step (`int`): 1-based index of the block in the trajectory, shown in the title.
        running (`bool`, defaults to `False`): the sandbox is still running it; the title gets a spinner.
    """
    metadata = {"title": (RUNNING_TITLE if running else CODE_TITLE).format(step=step)}
    if running:
        metadata["status"] = _PENDING
    return gr.ChatMessage(content=fenced(code, "python"), metadata=metadata)


def render_sandbox_output(output: SandboxOutput, step: int) -> gr.ChatMessage:
    """A collapsible message with what the sandbox returned: images (with any printed text), text, or the error.

    An error is titled as such; the model sees the same text and may correct itself on the next step.
    """
    if output.error and not output.images:
        return gr.ChatMessage(
            content=fenced(output.error, "text"),
            metadata={"title": ERROR_TITLE.format(step=step)},
        )
    title = RESULT_TITLE.format(step=step)
    if not output.images:
        text = output.shown_text.strip() or "(the code printed nothing)"
        return gr.ChatMessage(content=fenced(text, "text"), metadata={"title": title})
    content: list = [{"path": path} for path in output.images]
    return gr.ChatMessage(content=content, metadata={"title": title})


def render_answer(answer: str | None) -> gr.ChatMessage:
    """The final answer, set apart from the reasoning; a trajectory that ended without one says so."""
    if answer is None:
        return gr.ChatMessage(content=MISSING_ANSWER, metadata={"title": NO_ANSWER_TITLE})
    return gr.ChatMessage(content=f"{ANSWER_HEADING}\n\n{answer}")


def render_problem(message: str) -> gr.ChatMessage:
    """A readable error in the chat (bad input, unreachable backend, model failure); the app keeps serving."""
    return gr.ChatMessage(content=message, metadata={"title": PROBLEM_TITLE})


def render_trajectory(
    trajectory: Trajectory,
    *,
    show_reasoning: bool = True,
    running_code: bool = False,
    finished: bool = False,
) -> list[gr.ChatMessage]:
    """Renders the assistant side of one trajectory, in message order.

    Args:
        trajectory (`Trajectory`): the trajectory so far (it grows while the loop streams).
        show_reasoning (`bool`, defaults to `True`): include the model's prose; code, results and the answer are
            always shown.
        running_code (`bool`, defaults to `False`): the last code block is in the sandbox now (spinner on it).
        finished (`bool`, defaults to `False`): the loop has ended; a trajectory without an answer then gets a
            "no answer" message instead of silently stopping.

    Returns:
        `list[gr.ChatMessage]`: assistant messages, ready to append to the chat history.
    """
    messages: list[gr.ChatMessage] = []
    parts = trajectory.parts()
    step = 0
    answered = False
    for index, part in enumerate(parts):
        if isinstance(part, Prose):
            text = render_prose(part.text)
            if text and show_reasoning:
                messages.append(gr.ChatMessage(content=text))
        elif isinstance(part, Code):
            step += 1
            is_last = index == len(parts) - 1
            messages.append(render_code(part.code, step, running=running_code and is_last))
        elif isinstance(part, SandboxOutput):
            messages.append(render_sandbox_output(part, max(step, 1)))
        elif isinstance(part, Answer):
            answered = True
            messages.append(render_answer(part.answer))
    if finished and not answered:
        messages.append(render_answer(None))
    return messages


@dataclass
class TurnView:
    """What the chat shows for one question, built from the loop's events as they stream in.

    The loop may run several attempts (retries, then the fallback prompt, see :mod:`thyme.loop`); each attempt's
    trajectory is shown in order, a failed one followed by a note saying why it ended. Until the loop finishes, the
    last message is a pending one (the model writing, or a code block in the sandbox) so a slow backend is not
    mistaken for a stuck page.

    Example:
        >>> view = TurnView()
        >>> for event in agent.stream(image, question):  # doctest: +SKIP
        ...     view.apply(event)
        ...     chat = history + view.messages(show_reasoning=True)
    """

    attempts: list[Trajectory] = field(default_factory=list)
    fallback: list[bool] = field(default_factory=list)
    stop_reasons: list[str | None] = field(default_factory=list)
    running_code: bool = False
    result: RolloutResult | None = None
    stopped: bool = False

    def apply(self, event: Event) -> None:
        """Records one loop event (the trajectories themselves are the loop's live objects)."""
        if isinstance(event, AttemptStarted):
            self.attempts.append(event.trajectory)
            self.fallback.append(event.fallback)
            self.stop_reasons.append(None)
        elif isinstance(event, CodeStarted):
            self.running_code = True
        elif isinstance(event, SandboxFinished):
            self.running_code = False
        elif isinstance(event, AttemptFinished):
            self.stop_reasons[-1] = event.stop_reason
        elif isinstance(event, Finished):
            self.result = event.result
        elif not isinstance(event, TextGenerated):
            raise TypeError(f"unknown loop event {event!r}")

    def stop(self) -> None:
        """Marks a run the user cancelled: no spinner stays behind, and the chat says it was stopped."""
        if self.result is None:
            self.stopped = True

    @property
    def finished(self) -> bool:
        """True once the loop's Finished event arrived."""
        return self.result is not None

    def messages(self, *, show_reasoning: bool = True) -> list[gr.ChatMessage]:
        """The assistant messages for this question so far (see the class docstring)."""
        messages: list[gr.ChatMessage] = []
        last = len(self.attempts) - 1
        for index, (trajectory, reason) in enumerate(zip(self.attempts, self.stop_reasons, strict=True)):
            if self.fallback[index]:
                messages.append(gr.ChatMessage(content=FALLBACK_TEXT, metadata={"title": FALLBACK_TITLE}))
            is_current = index == last
            running = self.running_code and is_current and not self.stopped
            messages.extend(render_trajectory(trajectory, show_reasoning=show_reasoning, running_code=running))
            if reason in STOP_REASON_TEXT:
                title = FALLBACK_FAILED_TITLE if self.fallback[index] else RETRY_TITLE.format(attempt=index + 1)
                messages.append(gr.ChatMessage(content=STOP_REASON_TEXT[reason], metadata={"title": title}))
        if self.result is None:
            if self.stopped:
                messages.append(gr.ChatMessage(content=STOPPED_TEXT, metadata={"title": STOPPED_TITLE}))
            elif not self.running_code:
                messages.append(
                    gr.ChatMessage(content=THINKING_TEXT, metadata={"title": THINKING_TITLE, "status": _PENDING})
                )
            return messages
        shown = bool(self.attempts) and any(isinstance(p, Answer) for p in self.attempts[-1].parts())
        if not shown:
            messages.append(render_answer(self.result.answer if self.result.has_answer else None))
        return messages


__all__ = [
    "ANSWER_HEADING",
    "TurnView",
    "fenced",
    "render_answer",
    "render_code",
    "render_problem",
    "render_prose",
    "render_sandbox_output",
    "render_trajectory",
]
