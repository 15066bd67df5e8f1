"""One Thyme trajectory: the prompt, then the ordered pieces of the single assistant message (design.md section 1).

Segments (in ``Trajectory.segments``, in message order) are of two kinds, by where their bytes came from:

- :class:`ModelText`: exactly the text one backend call produced, with that call's :class:`Generation` (token ids,
  log-probs, finish reason) and the :class:`SamplingParams` used. Under ATS a code round is two calls (prose until
  ``<code>``, then greedy code until ``</code>``), so a code block may span two ``ModelText`` segments.
- :class:`SandboxOutput`: what the loop appended after running a code block: the images the code saved, or its text
  result, or the model-readable error; ``result`` keeps the sandbox's ``ExecutionResult`` (not serialised).

Because the bytes are kept as produced, rendering is exact: ``to_messages()`` concatenates them into one assistant
message (sandbox outputs INSIDE it, no added whitespace) and :func:`Trajectory.from_messages` inverts it.
The semantic view the UI and evaluator want (prose, code, sandbox output, answer) comes from :meth:`Trajectory.parts`,
which parses the whole message, so a code block split over two calls is one :class:`Code` part.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from thyme.backends.base import Generation, SamplingParams
from thyme.errors import ProtocolError
from thyme.protocol import (
    ANSWER_CLOSE,
    ANSWER_OPEN,
    CODE_BLOCK_RE,
    IMAGE_PLACEHOLDER,
    MISSING_ANSWER,
    SANDBOX_OUTPUT_CLOSE,
    SANDBOX_OUTPUT_OPEN,
    extract_answer,
)

FORMAT_VERSION = 1
_SANDBOX_RE = re.compile(re.escape(SANDBOX_OUTPUT_OPEN) + "(.*?)" + re.escape(SANDBOX_OUTPUT_CLOSE), re.DOTALL)


@dataclass
class ModelText:
    """Text produced by one backend call (or read from a file, then ``generation`` is None)."""

    text: str
    generation: Generation | None = None
    sampling: SamplingParams | None = None


@dataclass
class SandboxOutput:
    """What the loop appended after a code block. Exactly one of ``images`` / ``text`` / ``error`` is shown.

    Args:
        images (`list[str]`): absolute paths of the images the code saved, in print order.
        text (`str`, *optional*): the text result (stripped stdout) when no image came back.
        error (`str`, *optional*): the ``Sandbox for <id>: ...`` error; shown to the model when images and text are
            empty.
        stdout (`str`, defaults to `""`): the captured stdout (also when images came back), for display.
        result (`Any`, *optional*): the sandbox's ``ExecutionResult``; kept in memory only.
    """

    images: list[str] = field(default_factory=list)
    text: str | None = None
    error: str | None = None
    stdout: str = ""
    result: Any = field(default=None, repr=False, compare=False)

    @property
    def shown_text(self) -> str:
        """The text placed between the tags when there are no images ("" when there is nothing)."""
        if self.images:
            return ""
        if self.text is not None:
            return self.text
        return self.error or ""


Segment = ModelText | SandboxOutput


# Semantic parts (read-only views built by Trajectory.parts()).
@dataclass(frozen=True)
class Prose:
    """Model prose between code blocks and answers (``<think>`` tags included as written)."""

    text: str


@dataclass(frozen=True)
class Code:
    """A complete ``<code>...</code>`` block: ``text`` is the block as written, ``code`` its extracted body."""

    text: str
    code: str


@dataclass(frozen=True)
class Answer:
    """The first ``<answer>...</answer>``: ``text`` as written, ``answer`` parsed (see protocol.extract_answer)."""

    text: str
    answer: str


Part = Prose | Code | SandboxOutput | Answer


@dataclass
class Trajectory:
    """A whole Thyme conversation: system prompt, user turn (images + text) and the assistant message's segments.

    Args:
        system_prompt (`str`): the system message text.
        user_text (`str`): the text item that follows the image block(s) in the user message.
        image_paths (`list[str]`): the input image path(s), as the backend and sandbox see them.
        segments (`list[ModelText | SandboxOutput]`): the assistant message, in order.
        image_options (`dict`): extra keys for every image item (``min_pixels``/``max_pixels``).
        question (`str`, defaults to `""`): the question as asked (already formatted), for display and eval.
        metadata (`dict`): free-form facts (item id, attempt, stop reason, fallback) saved with the trajectory.
    """

    system_prompt: str
    user_text: str
    image_paths: list[str]
    segments: list[Segment] = field(default_factory=list)
    image_options: dict[str, int] = field(default_factory=dict)
    question: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)

    # ----- rendering ---------------------------------------------------------------------------------------------
    def _image_item(self, path: str) -> dict:
        return {"type": "image", "image": path, **self.image_options}

    def assistant_content(self) -> list[dict]:
        """The assistant message's content items: adjacent text merged, one image item per sandbox image."""
        items: list[dict] = []

        def add_text(text: str) -> None:
            if not text:
                return
            if items and items[-1]["type"] == "text":
                items[-1] = {"type": "text", "text": items[-1]["text"] + text}
            else:
                items.append({"type": "text", "text": text})

        for segment in self.segments:
            if isinstance(segment, ModelText):
                add_text(segment.text)
                continue
            add_text(SANDBOX_OUTPUT_OPEN)
            items.extend(self._image_item(path) for path in segment.images)
            add_text(segment.shown_text)
            add_text(SANDBOX_OUTPUT_CLOSE)
        return items

    def to_messages(self) -> list[dict]:
        """Renders the Hugging Face multimodal chat (CONTRACTS.md section 2).

        Returns:
            `list[dict]`: system and user messages, plus the assistant message when there is any segment; a backend
            continues a final assistant message rather than opening a new turn.
        """
        user = [self._image_item(path) for path in self.image_paths] + [{"type": "text", "text": self.user_text}]
        messages = [
            {"role": "system", "content": [{"type": "text", "text": self.system_prompt}]},
            {"role": "user", "content": user},
        ]
        content = self.assistant_content()
        if content:
            messages.append({"role": "assistant", "content": content})
        return messages

    @property
    def text(self) -> str:
        """The assistant message as text, images left out (what the original's answer parser read, reference 1.6)."""
        return "".join(item["text"] for item in self.assistant_content() if item["type"] == "text")

    # ----- views --------------------------------------------------------------------------------------------------
    def parts(self) -> list[Part]:
        """The assistant message as prose, code blocks, sandbox outputs and the answer, in order."""
        parts: list[Part] = []
        pending = ""
        for segment in self.segments:
            if isinstance(segment, ModelText):
                pending += segment.text
                continue
            parts.extend(_split_model_text(pending))
            pending = ""
            parts.append(segment)
        parts.extend(_split_model_text(pending))
        return parts

    @property
    def answer(self) -> str | None:
        """The parsed final answer, or None when the message has no complete answer tag."""
        return extract_answer(self.text)

    @property
    def answer_or_missing(self) -> str:
        """The answer, or the original's "No answer tag found in the final output." string."""
        answer = self.answer
        return MISSING_ANSWER if answer is None else answer

    @property
    def generations(self) -> list[Generation]:
        """Every backend call's Generation, in order (what a trainer builds its batch from)."""
        return [s.generation for s in self.segments if isinstance(s, ModelText) and s.generation is not None]

    @property
    def sandbox_outputs(self) -> list[SandboxOutput]:
        """Every sandbox output, in order."""
        return [s for s in self.segments if isinstance(s, SandboxOutput)]

    @property
    def sandbox_images(self) -> list[str]:
        """Paths of every image the sandbox returned, in message order (they follow the input images)."""
        return [path for output in self.sandbox_outputs for path in output.images]

    # ----- parsing and (de)serialisation ----------------------------------------------------------------------------
    @classmethod
    def from_messages(cls, messages: list[dict], *, question: str = "") -> Trajectory:
        """Inverse of :meth:`to_messages` (segments come back without Generations).

        Raises:
            ProtocolError: the messages are not [system, user(, assistant)] or a sandbox tag is unbalanced.
        """
        roles = [message.get("role") for message in messages]
        if roles not in (["system", "user"], ["system", "user", "assistant"]):
            raise ProtocolError(f"expected [system, user(, assistant)] messages, got roles {roles}")
        system = "".join(item["text"] for item in messages[0]["content"] if item["type"] == "text")
        user_items = messages[1]["content"]
        images = [item for item in user_items if item["type"] == "image"]
        image_options = {k: v for k, v in (images[0] if images else {}).items() if k not in ("type", "image")}
        user_text = "".join(item["text"] for item in user_items if item["type"] == "text")
        segments = parse_assistant_content(messages[2]["content"]) if len(messages) == 3 else []
        return cls(system, user_text, [item["image"] for item in images], segments, image_options, question)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (Generations and SamplingParams included, ExecutionResults left out)."""
        segments = []
        for segment in self.segments:
            if isinstance(segment, ModelText):
                segments.append(
                    {
                        "type": "model_text",
                        "text": segment.text,
                        "generation": asdict(segment.generation) if segment.generation else None,
                        "sampling": asdict(segment.sampling) if segment.sampling else None,
                    }
                )
            else:
                data = {k: v for k, v in asdict(segment).items() if k != "result"}
                segments.append({"type": "sandbox_output", **data})
        return {
            "format_version": FORMAT_VERSION,
            "question": self.question,
            "system_prompt": self.system_prompt,
            "user_text": self.user_text,
            "image_paths": list(self.image_paths),
            "image_options": dict(self.image_options),
            "segments": segments,
            "answer": self.answer,
            "metadata": self.metadata,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Trajectory:
        """Inverse of :meth:`to_dict`.

        Raises:
            ProtocolError: a key is missing or a segment type is unknown.
        """
        try:
            segments: list[Segment] = []
            for raw in data["segments"]:
                kind = raw["type"]
                if kind == "model_text":
                    generation = Generation(**raw["generation"]) if raw.get("generation") else None
                    sampling = SamplingParams(**raw["sampling"]) if raw.get("sampling") else None
                    segments.append(ModelText(raw["text"], generation, sampling))
                elif kind == "sandbox_output":
                    segments.append(
                        SandboxOutput(list(raw["images"]), raw.get("text"), raw.get("error"), raw.get("stdout", ""))
                    )
                else:
                    raise ProtocolError(
                        f"unknown trajectory segment type {kind!r} (expected model_text or sandbox_output)"
                    )
            return cls(
                data["system_prompt"],
                data["user_text"],
                list(data["image_paths"]),
                segments,
                dict(data.get("image_options", {})),
                data.get("question", ""),
                dict(data.get("metadata", {})),
            )
        except (KeyError, TypeError) as exc:
            raise ProtocolError(f"not a Thyme trajectory dict: {exc!r}") from exc

    def save(self, path: str | Path) -> Path:
        """Writes the trajectory as JSON (UTF-8) and returns the path."""
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), ensure_ascii=False, indent=2), encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> Trajectory:
        """Reads a trajectory written by :meth:`save`.

        Raises:
            ProtocolError: the file is not JSON or not a trajectory.
        """
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ProtocolError(f"cannot read trajectory {path}: {exc}") from exc
        return cls.from_dict(data)


def _split_model_text(text: str) -> list[Part]:
    """Splits model text into Prose / Code / Answer parts (the first answer only; text after it stays prose)."""
    parts: list[Part] = []
    position = 0
    answer_start = text.find(ANSWER_OPEN)
    answer_end = text.find(ANSWER_CLOSE, answer_start) if answer_start >= 0 else -1
    for match in CODE_BLOCK_RE.finditer(text, 0, answer_start if answer_end >= 0 else len(text)):
        if match.start() > position:
            parts.append(Prose(text[position : match.start()]))
        parts.append(Code(match.group(0), match.group(1).strip()))
        position = match.end()
    if answer_end >= 0:
        if answer_start > position:
            parts.append(Prose(text[position:answer_start]))
        end = answer_end + len(ANSWER_CLOSE)
        answer_text = text[answer_start:end]
        parts.append(Answer(answer_text, extract_answer(answer_text) or ""))
        position = end
    if position < len(text):
        parts.append(Prose(text[position:]))
    return parts


def parse_assistant_content(content: list[dict] | str, images: list[str] | None = None) -> list[Segment]:
    """Parses an assistant message into segments: text outside ``<sandbox_output>`` becomes ModelText, each
    sandbox block becomes a SandboxOutput with its images (image items inside the block) or its text.

    Args:
        content (`list[dict] | str`): HF content items, or plain text (then images inside a sandbox block are written
            as ``<image>`` placeholders, as in the released SFT data, and taken in order from ``images``).
        images (`list[str]`, *optional*): the paths for the placeholders in plain text.

    Raises:
        ProtocolError: a sandbox block does not close, or there are more placeholders than images.
    """
    if isinstance(content, str):
        pool = list(images or [])
        items: list[dict] = []
        for index, chunk in enumerate(content.split(IMAGE_PLACEHOLDER)):
            if index:
                if not pool:
                    raise ProtocolError("more <image> placeholders in the assistant text than images given")
                items.append({"type": "image", "image": pool.pop(0)})
            if chunk:
                items.append({"type": "text", "text": chunk})
        content = items
    segments: list[Segment] = []
    buffer = ""
    inside: SandboxOutput | None = None
    for item in content:
        if item["type"] == "image":
            if inside is None:
                raise ProtocolError(f"image {item['image']!r} outside a sandbox output block in the assistant message")
            inside.images.append(item["image"])
            continue
        buffer += item["text"]
        while True:
            if inside is None:
                start = buffer.find(SANDBOX_OUTPUT_OPEN)
                if start < 0:
                    break
                if start:
                    _append_text(segments, buffer[:start])
                buffer = buffer[start + len(SANDBOX_OUTPUT_OPEN) :]
                inside = SandboxOutput()
            end = buffer.find(SANDBOX_OUTPUT_CLOSE)
            if end < 0:
                break
            if buffer[:end]:
                inside.text = buffer[:end]
            segments.append(inside)
            inside, buffer = None, buffer[end + len(SANDBOX_OUTPUT_CLOSE) :]
    if inside is not None:
        raise ProtocolError("a <sandbox_output> block in the assistant message never closes")
    if buffer:
        _append_text(segments, buffer)
    return segments


def _append_text(segments: list[Segment], text: str) -> None:
    if segments and isinstance(segments[-1], ModelText) and segments[-1].generation is None:
        segments[-1] = ModelText(segments[-1].text + text)
    else:
        segments.append(ModelText(text))


__all__ = [
    "Answer",
    "Code",
    "ModelText",
    "Part",
    "Prose",
    "SandboxOutput",
    "Segment",
    "Trajectory",
    "parse_assistant_content",
]
