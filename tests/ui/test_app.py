"""The demo's handlers called directly (no server): settings, follow-ups, failures shown in the chat, real backends."""

from __future__ import annotations

import json
from pathlib import Path

import gradio as gr
import pytest

from tests.fixtures.demo_app import free_port
from tests.fixtures.openai_server import SERVED_MODEL_NAME
from thyme.agent import ThymeAgent
from thyme.backends.openai_compat import OpenAIBackend
from thyme.backends.scripted import ScriptedBackend
from thyme.config import AgentConfig
from thyme.ui.app import (
    NO_IMAGE,
    README_SCRIPT,
    Conversation,
    clear_conversation,
    delete_conversation,
    follow_up_question,
    make_add_message,
    make_bot_response,
    redraw,
    shared_agent_factory,
)

EXAMPLE = json.loads(README_SCRIPT.read_text(encoding="utf-8"))
DEFAULT_SETTINGS = (5, "greedy", 1.0, 12_845_056, True)


class _RecordingFactory:
    """An agent factory that replays the README example and remembers the configs it was given."""

    def __init__(self, sandbox):
        self.sandbox = sandbox
        self.configs: list[AgentConfig] = []

    def __call__(self, config: AgentConfig) -> ThymeAgent:
        self.configs.append(config)
        return ThymeAgent(ScriptedBackend(README_SCRIPT), config, sandbox=self.sandbox)


class _FailingBackend:
    def __init__(self, error: Exception):
        self.error = error

    def generate(self, messages, *, stop, sampling):
        raise self.error

    def close(self) -> None:
        pass


def _run(factory, conversation, text, image=None, settings=DEFAULT_SETTINGS, base=None):
    """add_message then bot_response, as the page chains them; returns the final chat."""
    base = base or AgentConfig()
    files = [str(image)] if image else []
    chat, box, conversation = make_add_message(base.max_input_pixels)(
        {"text": text, "files": files}, conversation, True
    )
    assert box.interactive is False  # the input is locked while the answer streams
    outputs = list(make_bot_response(factory, base)(conversation, *settings))
    return outputs[-1][0], conversation, outputs


def _text(message: gr.ChatMessage) -> str:
    return message.content if isinstance(message.content, str) else json.dumps(message.content)


def test_bot_response_passes_the_settings_panel_to_the_agent(ui_sandbox, example_image):
    factory = _RecordingFactory(ui_sandbox)
    conversation = Conversation()
    chat, conversation, outputs = _run(
        factory, conversation, "plate?", example_image, (3, "ats", 0.7, 1_003_520, True)
    )
    (config,) = factory.configs
    assert (config.max_generation_calls, config.sampling, config.temperature, config.max_pixels) == (
        3, "ats", 0.7, 1_003_520,
    )  # fmt: skip
    assert config.images_dir.parent == conversation.work_dir  # this tab's folder
    assert len(outputs) > 3 and chat[-1].content == "### Answer\n\nC. S QT 911"
    delete_conversation(conversation)
    assert not conversation.work_dir.exists()


def test_bot_response_bad_settings_are_explained_in_the_chat(ui_sandbox, example_image):
    chat, _, _ = _run(_RecordingFactory(ui_sandbox), None, "plate?", example_image, (1, "ats", 1.0, 12_845_056, True))
    assert chat[-1].metadata["title"] == "Error"
    assert "sampling='ats' needs max_generation_calls >= 2" in chat[-1].content


def test_bot_response_unreachable_backend_is_explained_and_the_next_question_works(ui_sandbox, example_image):
    backend = OpenAIBackend(f"http://127.0.0.1:{free_port()}/v1", model="thyme", max_retries=0)
    chat, conversation, _ = _run(shared_agent_factory(backend, ui_sandbox), None, "plate?", example_image)
    assert chat[-1].metadata["title"] == "Error"
    assert chat[-1].content.startswith("The model backend failed:") and "127.0.0.1" in chat[-1].content
    chat, _, _ = _run(_RecordingFactory(ui_sandbox), conversation, EXAMPLE["question"])
    assert chat[-1].content == "### Answer\n\nC. S QT 911"


def test_bot_response_model_error_is_explained(ui_sandbox, example_image):
    factory = shared_agent_factory(_FailingBackend(RuntimeError("CUDA out of memory")), ui_sandbox)
    chat, _, _ = _run(factory, None, "plate?", example_image)
    assert chat[-1].content == "The model raised an error: RuntimeError: CUDA out of memory"


def test_bot_response_without_a_pending_question_changes_nothing(ui_sandbox):
    conversation = Conversation()
    chat, _, conversation = make_add_message(10**8)({"text": "hi", "files": []}, conversation, True)
    assert chat[-1].content == NO_IMAGE
    outputs = list(make_bot_response(_RecordingFactory(ui_sandbox), AgentConfig())(conversation, *DEFAULT_SETTINGS))
    assert len(outputs) == 1 and [m.content for m in outputs[0][0]] == [m.content for m in chat]


def test_follow_up_question_carries_earlier_answers_until_a_new_image(ui_sandbox, example_image, tmp_path):
    factory = _RecordingFactory(ui_sandbox)
    _, conversation, _ = _run(factory, None, "What is the plate number?", example_image)
    assert follow_up_question(conversation, "Which letter?") == (
        "Earlier questions about this image and their answers:\n"
        "Q: What is the plate number?\nA: C. S QT 911\n\n"
        "Now answer this question:\nWhich letter?"
    )
    _run(factory, conversation, "Which letter?")
    asked = [turn.asked for turn in conversation.turns]
    assert asked[0] == "What is the plate number?" and asked[1].endswith("Now answer this question:\nWhich letter?")
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not a PNG")
    _run(factory, conversation, "This one?", not_an_image)  # refused: the subject stays
    _run(factory, conversation, "Still there?")
    assert conversation.turns[-1].asked.startswith("Earlier questions about this image")
    _run(factory, conversation, "And now?", example_image)  # a new upload starts a new subject
    assert conversation.turns[-1].asked == "And now?"


def test_redraw_hides_and_shows_reasoning_of_past_answers(ui_sandbox, example_image):
    chat, conversation, _ = _run(_RecordingFactory(ui_sandbox), None, "plate?", example_image)
    hidden = redraw(conversation, False)
    assert len(hidden) == len(chat) - 2  # the two prose messages
    assert not any(_text(m).startswith("To determine the plate number") for m in hidden)
    assert [_text(m) for m in redraw(conversation, True)] == [_text(m) for m in chat]


def test_bot_response_shows_an_error_in_the_model_code_as_a_sandbox_error(ui_sandbox, example_image):
    script = [
        "<think>Let me look.\n<code>\n```python\nprint(undefined_name)\n```\n</code>",
        "</think><answer>A</answer>",
    ]
    factory = shared_agent_factory(ScriptedBackend(script), ui_sandbox)
    chat, _, _ = _run(factory, None, "plate?", example_image)
    (error,) = [m for m in chat if m.metadata.get("title") == "Sandbox error (step 1)"]
    assert (
        error.content == "```text\nSandbox for 17127: Code execution failed: name 'undefined_name' is not defined\n```"
    )
    assert chat[-1].content == "### Answer\n\nA"  # the model read the error and went on


def test_clear_conversation_empties_the_chat_and_removes_the_tab_files(ui_sandbox, example_image):
    _, conversation, _ = _run(_RecordingFactory(ui_sandbox), None, "plate?", example_image)
    assert (conversation.work_dir / "thyme_trajectory.zip").is_file()
    chat, state, download, box = clear_conversation(conversation)
    assert (chat, state, download.visible, box.interactive) == ([], None, False, True)
    assert not conversation.work_dir.exists()


def test_next_question_after_a_cancelled_run_marks_that_run_stopped(ui_sandbox, example_image):
    factory = _RecordingFactory(ui_sandbox)
    *_, conversation = make_add_message(10**8)({"text": "plate?", "files": [str(example_image)]}, None, True)
    stream = make_bot_response(factory, AgentConfig())(conversation, *DEFAULT_SETTINGS)
    next(stream)  # the first event arrived, then the client went away (API job cancelled, tab closed)
    stream.close()
    chat, _, _ = _run(factory, conversation, "again?")
    assert conversation.turns[0].view.stopped and not conversation.turns[1].view.stopped
    assert [m.metadata.get("title") for m in chat].count("Stopped") == 1
    assert chat[-1].content == "### Answer\n\nC. S QT 911"


@pytest.mark.slow
def test_demo_runs_the_tiny_model_through_the_real_path(tiny_model_dir: Path, ui_sandbox, example_image):
    agent = ThymeAgent.from_pretrained(tiny_model_dir, device="cpu")
    base = AgentConfig(max_new_tokens=8, max_attempts=1, use_fallback=False)
    try:
        settings = (1, "greedy", 1.0, 3136 * 4, True)
        chat, conversation, _ = _run(shared_agent_factory(agent.backend, ui_sandbox), None, "plate?", example_image,
                                     settings, base)  # fmt: skip
    finally:
        agent.close()
    (trajectory,) = conversation.trajectories()
    generation = trajectory.generations[0]
    assert generation.token_ids and len(generation.token_ids) <= 8  # the tiny model really generated
    assert chat[0].role == "user" and chat[0].content == {"path": str(example_image)}
    # Random weights never write an answer tag: the chat says so instead of stopping silently.
    assert chat[-1].metadata["title"] == "No answer"


@pytest.mark.slow
def test_demo_runs_an_openai_compatible_endpoint(tiny_openai_server, ui_sandbox, example_image):
    backend = OpenAIBackend(tiny_openai_server.url, model=SERVED_MODEL_NAME)
    base = AgentConfig(max_new_tokens=8, max_attempts=1, use_fallback=False)
    chat, conversation, _ = _run(shared_agent_factory(backend, ui_sandbox), None, "plate?", example_image,
                                 (1, "greedy", 1.0, 3136 * 4, True), base)  # fmt: skip
    request = tiny_openai_server.requests[-1]
    assert request["model"] == SERVED_MODEL_NAME and request["max_tokens"] == 8
    image_items = [p for p in request["messages"][1]["content"] if p["type"] == "image_url"]
    assert len(image_items) == 1 and image_items[0]["image_url"]["url"].startswith("data:image/")
    assert conversation.trajectories()[0].generations  # the server's text is the trajectory's model text
    assert chat[-1].metadata["title"] == "No answer"


def test_several_uploads_with_one_question_reach_the_model_and_a_bad_one_refuses_all(ui_sandbox, tmp_path):
    from PIL import Image

    red, blue = tmp_path / "red.png", tmp_path / "blue.png"
    Image.new("RGB", (40, 30), "red").save(red)
    Image.new("RGB", (50, 20), "blue").save(blue)
    backend = ScriptedBackend(["<answer>two</answer>"])
    factory = shared_agent_factory(backend, ui_sandbox)
    add = make_add_message(AgentConfig().max_input_pixels)
    chat, _, conversation = add({"text": "How many?", "files": [str(red), str(blue)]}, None, True)
    assert [m.content for m in chat[:2]] == [{"path": str(red)}, {"path": str(blue)}]
    final = list(make_bot_response(factory, AgentConfig())(conversation, *DEFAULT_SETTINGS))[-1][0]
    assert "two" in _text(final[-1])
    user = backend.calls[0].messages[1]["content"]
    assert [item.get("image") for item in user[:2]] == [str(red), str(blue)]
    assert user[-1]["text"].count("### User Image Path") == 2
    broken = tmp_path / "broken.png"
    broken.write_text("not a PNG")
    _, _, conversation = add({"text": "And these?", "files": [str(red), str(broken)]}, conversation, True)
    assert conversation.turns[-1].problem.startswith("That file cannot be used as an image")
    assert conversation.image_paths == [str(red), str(blue)]  # the earlier pair stays the subject
