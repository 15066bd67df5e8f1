"""The Thyme demo app: upload an image, ask, and watch the model reason, run code, get its crops back and answer.

Handlers first, then one ``gr.Blocks`` (Gradio's ``demo/chatbot_multimodal`` shape): ``add_message`` takes the upload
and the question and locks the input, ``bot_response`` streams the loop's events into the chat, ``unlock_input``
opens the input again. The chat is always re-rendered from the per-tab :class:`Conversation` (a ``gr.State``), so the
"show reasoning" switch can redraw past answers and two browser tabs never see each other's messages. Every question
runs in its own sandbox session(s) (the loop opens them) and keeps its images in its own folder under the tab's
work directory, which is removed when the tab's session ends.

Several images can be uploaded with one question (the model sees them all, the code gets every path); follow-up
questions reuse the conversation's image(s). The released weights were trained on single questions, so a
follow-up is a new trajectory whose question carries the earlier questions and answers as a short preamble.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr

import thyme
from thyme.agent import ThymeAgent
from thyme.config import DEFAULT_MAX_GENERATION_CALLS, DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS, AgentConfig
from thyme.errors import BackendError, ThymeError
from thyme.images import read_image_size
from thyme.sandbox.errors import SandboxError
from thyme.trajectory import Trajectory
from thyme.ui.export import write_conversation_zip
from thyme.ui.render import TurnView, render_problem

logger = logging.getLogger(__name__)

AgentFactory = Callable[[AgentConfig], ThymeAgent]

# The README example ships as package data of the core (thyme/data/examples); the demo reuses it, no copy.
EXAMPLES_DIR = Path(thyme.__file__).resolve().parent / "data" / "examples"
README_SCRIPT = EXAMPLES_DIR / "readme_17127.json"
TITLE = "Thyme: thinking with images by writing code"
ZIP_NAME = "thyme_trajectory.zip"
# Qwen2.5-VL sees images in 28x28-pixel patches; the max-pixels slider moves in whole patches.
PIXEL_STEP = 28 * 28
MAX_GENERATION_CALLS_LIMIT = 20
# Gradio turns pasted text longer than this into a .txt upload; a long multiple-choice question must stay text.
MAX_PASTED_QUESTION_CHARS = 20_000
FOLLOW_UP_PREAMBLE = "Earlier questions about this image and their answers:\n{history}\n\nNow answer this question:\n"
NO_IMAGE = "No image yet: upload or paste an image (or pick the example below), then ask a question about it."
NO_QUESTION = "Image received. Now type a question about it."
NOT_AN_IMAGE = "That file cannot be used as an image: {error}"
SAMPLING_CHOICES = [("Greedy (as the original evaluation)", "greedy"), ("ATS: prose sampled, code greedy", "ats")]


@dataclass
class Turn:
    """One question of a conversation and what the chat shows for it."""

    question: str
    new_images: list[str] = field(default_factory=list)  # the files attached with this question, shown as messages
    image_accepted: bool = False  # the files are images and became the conversation's images
    view: TurnView | None = None  # set when the question ran (or runs)
    problem: str | None = None  # a readable error instead of a run
    asked: str | None = None  # the question as sent to the model (follow-ups carry a preamble)


@dataclass
class Conversation:
    """Everything one browser tab has: its image(s), its turns, and its private work directory."""

    image_paths: list[str] = field(default_factory=list)
    turns: list[Turn] = field(default_factory=list)
    work_dir: Path | None = None

    def directory(self) -> Path:
        """The tab's private directory (created on first use; removed by :func:`delete_conversation`)."""
        if self.work_dir is None:
            self.work_dir = Path(tempfile.mkdtemp(prefix="thyme-demo-"))
        return self.work_dir

    def messages(self, *, show_reasoning: bool) -> list[gr.ChatMessage]:
        """The whole chat, rendered from the turns."""
        messages: list[gr.ChatMessage] = []
        for turn in self.turns:
            for image in turn.new_images:
                messages.append(gr.ChatMessage(role="user", content={"path": image}))
            if turn.question:
                messages.append(gr.ChatMessage(role="user", content=turn.question))
            if turn.problem:
                messages.append(render_problem(turn.problem))
            elif turn.view is not None:
                messages.extend(turn.view.messages(show_reasoning=show_reasoning))
        return messages

    def stop(self) -> None:
        """Marks the run in progress, if any, as stopped by the user (its partial trajectory stays visible)."""
        for turn in self.turns:
            if turn.view is not None:
                turn.view.stop()

    def trajectories(self) -> list[Trajectory]:
        """Every trajectory run in this tab (retries and fallbacks included), oldest first."""
        return [t for turn in self.turns if turn.view is not None for t in turn.view.attempts]


def delete_conversation(conversation: Conversation | None) -> None:
    """``gr.State`` delete callback: removes the tab's images and downloads when its session ends."""
    if conversation is not None and conversation.work_dir is not None:
        shutil.rmtree(conversation.work_dir, ignore_errors=True)


def follow_up_question(conversation: Conversation, question: str) -> str:
    """The question as sent to the model: with the earlier answered questions on the same image as a preamble."""
    history = []
    for turn in conversation.turns:
        result = turn.view.result if turn.view is not None else None
        if turn.image_accepted:
            history = []  # a new image starts a new subject
        if result is not None and result.has_answer:
            history.append(f"Q: {turn.question}\nA: {result.answer}")
    if not history:
        return question
    return FOLLOW_UP_PREAMBLE.format(history="\n".join(history)) + question


def make_add_message(max_input_pixels: int) -> Callable[..., tuple]:
    """Builds the handler that takes the upload and question, refusing images over ``max_input_pixels``."""

    def add_message(message: dict | None, conversation: Conversation | None, show_reasoning: bool) -> tuple:
        """Takes the upload and question from the input box, validates the image, and locks the input.

        Returns:
            The chat, the cleared and locked input box, and the conversation.
        """
        conversation = conversation or Conversation()
        conversation.stop()  # a run cancelled from the API (no Stop click) must not keep its spinner
        message = message or {}
        question = (message.get("text") or "").strip()
        files = [f if isinstance(f, str) else f["path"] for f in message.get("files") or []]
        turn = Turn(question=question, new_images=files)
        if files:
            try:
                for file in files:  # all or none: a question about three images must not run on two
                    read_image_size(file, max_pixels=max_input_pixels)
            except ThymeError as exc:
                turn.problem = NOT_AN_IMAGE.format(error=exc)
            else:
                conversation.image_paths, turn.image_accepted = list(files), True
        if turn.problem is None:
            if not conversation.image_paths:
                turn.problem = NO_IMAGE
            elif not question:
                turn.problem = NO_QUESTION
            else:
                turn.asked = question if turn.image_accepted else follow_up_question(conversation, question)
        conversation.turns.append(turn)
        chat = conversation.messages(show_reasoning=show_reasoning)
        return chat, gr.MultimodalTextbox(value=None, interactive=False), conversation

    return add_message


def _config_from_settings(base: AgentConfig, settings: tuple, images_dir: Path) -> AgentConfig:
    """Applies the settings panel to the app's base config (``replace`` re-runs its checks: ConfigError)."""
    max_calls, sampling, temperature, max_pixels = settings
    return dataclasses.replace(
        base,
        max_generation_calls=int(max_calls),
        sampling=sampling,
        temperature=float(temperature),
        max_pixels=int(max_pixels),
        images_dir=images_dir,
    )


def _describe_failure(exc: BaseException) -> str:
    """A chat-readable line for a failed run; the app keeps serving."""
    if isinstance(exc, BackendError):
        return f"The model backend failed: {exc}"
    if isinstance(exc, SandboxError):
        return f"The sandbox failed: {exc}"
    if isinstance(exc, ThymeError):
        return str(exc)
    return f"The model raised an error: {type(exc).__name__}: {exc}"


def make_bot_response(agent_factory: AgentFactory, base_config: AgentConfig) -> Callable[..., Iterator[Any]]:
    """Builds the streaming handler bound to the app's agent factory and base config."""

    def bot_response(
        conversation: Conversation | None,
        max_generation_calls: int,
        sampling: str,
        temperature: float,
        max_pixels: int,
        show_reasoning: bool,
    ) -> Iterator[tuple[list[gr.ChatMessage], Conversation | None, Any]]:
        """Runs the pending question through the agent and streams the chat after every loop event."""
        turn = conversation.turns[-1] if conversation is not None and conversation.turns else None
        if turn is None or turn.view is not None or turn.asked is None:  # nothing to run (a problem, or ran)
            chat = conversation.messages(show_reasoning=show_reasoning) if conversation else []
            yield chat, conversation, gr.DownloadButton()
            return
        turn.view = TurnView()
        images_dir = conversation.directory() / f"turn_{len(conversation.turns)}"
        settings = (max_generation_calls, sampling, temperature, max_pixels)
        try:
            config = _config_from_settings(base_config, settings, images_dir)
            agent = agent_factory(config)
            images = conversation.image_paths
            for event in agent.stream(images if len(images) > 1 else images[0], turn.asked):
                turn.view.apply(event)
                yield conversation.messages(show_reasoning=show_reasoning), conversation, gr.DownloadButton()
        # torch raises RuntimeError subclasses (out of memory, device errors) that backends do not wrap; any of
        # these ends this question only, with the reason in the chat.
        except (ThymeError, SandboxError, RuntimeError) as exc:
            logger.warning("demo question failed: %s", exc, exc_info=not isinstance(exc, ThymeError))
            turn.view, turn.problem = None, _describe_failure(exc)
            yield conversation.messages(show_reasoning=show_reasoning), conversation, gr.DownloadButton()
            return
        chat = conversation.messages(show_reasoning=show_reasoning)
        try:
            archive = write_conversation_zip(conversation.trajectories(), conversation.directory() / ZIP_NAME)
        except OSError as exc:  # e.g. an upload Gradio already cleaned up: the answer stands, the zip is skipped
            logger.warning("demo could not write the trajectory zip: %s", exc)
            yield chat, conversation, gr.DownloadButton(visible=False)
            return
        yield chat, conversation, gr.DownloadButton(value=str(archive), visible=True)

    return bot_response


def redraw(conversation: Conversation | None, show_reasoning: bool) -> list[gr.ChatMessage]:
    """Re-renders the chat when the "show reasoning" switch changes."""
    return conversation.messages(show_reasoning=show_reasoning) if conversation else []


def stop_run(conversation: Conversation | None, show_reasoning: bool) -> tuple:
    """The Stop button (its click also cancels the streaming event): marks the run stopped, unlocks the input."""
    if conversation is None:
        return [], gr.MultimodalTextbox(interactive=True)
    conversation.stop()
    return conversation.messages(show_reasoning=show_reasoning), gr.MultimodalTextbox(interactive=True)


def stop_button(active: bool) -> gr.Button:
    """The Stop button, lit only while a question runs (lit while idle it looks as if something were running)."""
    return gr.Button(interactive=active)


def unlock_input() -> gr.MultimodalTextbox:
    """Opens the input box again after a run (finished, failed or stopped)."""
    return gr.MultimodalTextbox(interactive=True)


def clear_conversation(conversation: Conversation | None):
    """Starts over in this tab: empties the chat and removes the tab's files."""
    delete_conversation(conversation)
    return [], None, gr.DownloadButton(value=None, visible=False), gr.MultimodalTextbox(value=None, interactive=True)


def scripted_agent_factory(script: str | Path, sandbox: Any) -> AgentFactory:
    """Agents that replay ``script`` (a fresh replay per question, since a replay is used up) in ``sandbox``."""
    from thyme.backends.scripted import ScriptedBackend, load_script

    segments = load_script(script)  # read once: a bad file fails at startup, not on the first question
    return lambda config: ThymeAgent(ScriptedBackend(segments), config, sandbox=sandbox)


def shared_agent_factory(backend: Any, sandbox: Any) -> AgentFactory:
    """Agents sharing one loaded backend and one sandbox (each question still gets its own sandbox session)."""
    return lambda config: ThymeAgent(backend, config, sandbox=sandbox)


def readme_example() -> dict:
    """The original README's example as a demo input: ``{"text": question, "files": [17127.jpg]}``."""
    import json

    data = json.loads(README_SCRIPT.read_text(encoding="utf-8"))
    return {"text": data["question"], "files": [str(EXAMPLES_DIR / data["image"])]}


def scripted_description(script: str | Path) -> str:
    """The banner of a scripted demo: says plainly that the answers are a recording, whatever the question."""
    return (
        f"**Scripted replay** of `{Path(script).name}`: every question gets the recorded model text of the original "
        "README example (the license plate of the blue car), run through the real loop and sandbox. Start "
        "`thyme demo` with `--model` or `--endpoint` for a real model."
    )


def _settings_panel(base_config: AgentConfig) -> list[gr.components.Component]:
    """The settings controls, in the order ``bot_response`` takes them: calls, sampling, temperature, max pixels,
    show reasoning. Ranges widen to include the base config's values (a CLI may set more than the defaults)."""
    max_calls = gr.Slider(
        1, max(MAX_GENERATION_CALLS_LIMIT, base_config.max_generation_calls),
        value=base_config.max_generation_calls, step=1,
        label="Max generation calls", info=f"per attempt (the original: {DEFAULT_MAX_GENERATION_CALLS})",
    )  # fmt: skip
    sampling = gr.Radio(SAMPLING_CHOICES, value=base_config.sampling, label="Sampling")
    temperature = gr.Slider(
        0.05, 2.0, value=base_config.temperature, step=0.05, label="Temperature",
        info="prose temperature under ATS (code stays greedy)",
    )  # fmt: skip
    max_pixels = gr.Slider(
        DEFAULT_MIN_PIXELS, max(DEFAULT_MAX_PIXELS, base_config.max_pixels),
        value=base_config.max_pixels, step=PIXEL_STEP,
        label="Max pixels", info="per image the model sees (the sandbox always gets the original)",
    )  # fmt: skip
    show_reasoning = gr.Checkbox(value=True, label="Show reasoning")
    return [max_calls, sampling, temperature, max_pixels, show_reasoning]


def build_demo(
    agent_factory: AgentFactory,
    *,
    base_config: AgentConfig | None = None,
    examples: list[dict] | None = None,
    description: str = "",
    concurrency_limit: int = 1,
) -> gr.Blocks:
    """Builds the demo.

    Args:
        agent_factory (`Callable[[AgentConfig], ThymeAgent]`): makes the agent for one question with the settings
            the user chose (a shared backend and sandbox for a real model; a fresh replay for ``--scripted``). The
            agents it returns are not closed by the app: the factory's owner closes the backend and sandbox.
        base_config (`AgentConfig`, *optional*): settings the panel does not expose (tokens per call, attempts...).
        examples (`list[dict]`, *optional*): example inputs, each ``{"text": question, "files": [image_path]}``.
        description (`str`, defaults to `""`): Markdown under the title (e.g. which backend answers).
        concurrency_limit (`int`, defaults to `1`): questions answered at the same time; the others queue. 1 suits
            one local model on one GPU; a server that batches (vLLM) or a replay can take more.

    Returns:
        `gr.Blocks`: call ``.queue().launch(...)`` on it. Endpoints: ``/add_message`` then ``/bot_response``.
    """
    base_config = base_config or AgentConfig()
    add_message = make_add_message(base_config.max_input_pixels)
    bot_response = make_bot_response(agent_factory, base_config)
    with gr.Blocks(title="Thyme demo") as demo:
        gr.Markdown(f"# {TITLE}\n{description}")
        conversation = gr.State(None, delete_callback=delete_conversation)
        with gr.Row():
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(label="Thyme", height="72vh", group_consecutive_messages=False, buttons=["copy"])
                chat_input = gr.MultimodalTextbox(
                    file_types=["image"],
                    file_count="multiple",
                    placeholder="Upload or paste an image (or several), then ask a question about it",
                    max_plain_text_length=MAX_PASTED_QUESTION_CHARS,
                    show_label=False,
                    sources=["upload"],
                )
                with gr.Row():
                    stop = gr.Button("Stop", variant="stop", size="sm", interactive=False)
                    clear = gr.Button("Clear conversation", size="sm")
                    download = gr.DownloadButton("Download trajectory (JSON + images, zip)", visible=False, size="sm")
                if examples:
                    gr.Examples(examples=[[example] for example in examples], inputs=[chat_input], label="Example")
            with gr.Column(scale=1), gr.Accordion("Settings", open=True):
                settings = _settings_panel(base_config)
        show_reasoning = settings[-1]
        submitted = chat_input.submit(
            add_message, [chat_input, conversation, show_reasoning], [chatbot, chat_input, conversation]
        )
        started = submitted.then(lambda: stop_button(True), None, stop, api_visibility="private")
        running = started.then(
            bot_response,
            [conversation, *settings],
            [chatbot, conversation, download],
            api_name="bot_response",
            concurrency_limit=concurrency_limit,
        )
        running.then(unlock_input, None, chat_input, api_visibility="private").then(
            lambda: stop_button(False), None, stop, api_visibility="private"
        )
        stopped = stop.click(
            stop_run, [conversation, show_reasoning], [chatbot, chat_input], cancels=[running], api_name="stop"
        )
        stopped.then(lambda: stop_button(False), None, stop, api_visibility="private")
        cleared = clear.click(
            clear_conversation, conversation, [chatbot, conversation, download, chat_input], cancels=[running]
        )
        cleared.then(lambda: stop_button(False), None, stop, api_visibility="private")
        show_reasoning.change(redraw, [conversation, show_reasoning], chatbot, api_visibility="private")
    return demo


__all__ = [
    "EXAMPLES_DIR",
    "README_SCRIPT",
    "AgentFactory",
    "Conversation",
    "Turn",
    "build_demo",
    "follow_up_question",
    "readme_example",
    "scripted_agent_factory",
    "scripted_description",
    "shared_agent_factory",
    "stop_button",
]
