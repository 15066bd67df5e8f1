"""The prompts the released weights were trained with, byte for byte (thyme-reference.md section 1.2).

The texts live in package data (``thyme/data/*.txt``) and their hashes are checked at import: a changed byte would
make the released Thyme weights misbehave silently. The question formatters reproduce VLMEvalKit's
``ThymePromptMixin``, which built the benchmark question before the user template wrapped it.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from importlib import resources

from thyme.protocol import ANSWER_CLOSE, ANSWER_OPEN, IMAGE_PLACEHOLDER, THINK_CLOSE, THINK_OPEN

SYSTEM_PROMPT_SHA256 = "c5e7db63596377f9a1afef0dd131d282b2f9e6c873058c056c5c0aa5a89f99a7"
# The fallback conversation's system prompt (reference 1.2 "Fallback prompt").
FALLBACK_SYSTEM_PROMPT = "You are a helpful assistant."
SIZE_UNKNOWN = "Unable to determine (error reading image)"

MCQ_INSTRUCTION = "Please select the correct answer from the options above."
MCQ_INSTRUCTION_CJK = "请直接回答选项字母。"
YES_NO_INSTRUCTION = " Please answer yes or no."
VQA_INSTRUCTION = "\nPlease try to answer the question with short words or phrases if possible."
_CJK_RE = re.compile("[\u4e00-\u9fff]")

_IMAGE_LINES = '### User Image Path:** "{path}"\n' + '### User Image Size:** "{size}"\n'
_USER_TEMPLATE = (
    IMAGE_PLACEHOLDER
    + "\n{question}\n\n"
    + "{image_lines}\n"
    + "### **Output Format (strict adherence required):**\n\n"
    + f"{THINK_OPEN}Your detailed reasoning process, including any code, should go here.{THINK_CLOSE}\n"
    + f"{ANSWER_OPEN}Your final answer to the user's question goes here.{ANSWER_CLOSE}\n"
)


def _read_data(name: str) -> str:
    return resources.files("thyme").joinpath("data", name).read_text(encoding="utf-8")


SYSTEM_PROMPT = _read_data("system_prompt.txt")
if hashlib.sha256(SYSTEM_PROMPT.encode("utf-8")).hexdigest() != SYSTEM_PROMPT_SHA256:
    raise RuntimeError(
        "thyme/data/system_prompt.txt does not match the released weights' system prompt (sha256 mismatch); "
        "reinstall thyme or restore the file from git"
    )
_FALLBACK_TEMPLATE = _read_data("fallback_prompt.txt")


def image_size_text(width: int | None, height: int | None) -> str:
    """``"WxH"``, or the original's "Unable to determine" text when the size could not be read."""
    return SIZE_UNKNOWN if width is None or height is None else f"{width}x{height}"


def user_prompt(question: str, image_path: str, width: int | None, height: int | None) -> str:
    """Renders the official user turn text (``generate_prompt_final_qa``), ``<image>`` line included.

    Args:
        question (`str`): the (already benchmark-formatted) question; may span several lines.
        image_path (`str`): the path exactly as the sandbox will receive it.
        width (`int`, *optional*): ORIGINAL pixel width; None renders the "Unable to determine" variant.
        height (`int`, *optional*): ORIGINAL pixel height.

    Example:
        >>> user_prompt("What is the color of the car?", "/tmp/ex.jpg", 640, 480).splitlines()[:2]
        ['<image>', 'What is the color of the car?']
    """
    return user_prompt_images(question, [(image_path, width, height)])


def user_prompt_images(question: str, images: Sequence[tuple[str, int | None, int | None]]) -> str:
    """The user turn text for one or several input images: the official template, with the path and size lines
    repeated once per image, in input order.

    The released weights never saw several input images with this template (their SFT and RL rows carry one input,
    ``images[0]``; VLMEvalKit's MMMU prompt puts all images first and the template names one path). Repeating the two
    lines the model was trained on keeps every line in distribution and tells the code where each image is; with
    one image the text is byte-identical to :func:`user_prompt`. The image items themselves all come before the
    text (as VLMEvalKit's MMMU prompt did), so the leading ``<image>`` still stands for the vision blocks.

    Args:
        question (`str`): the (already benchmark-formatted) question.
        images (`Sequence[tuple[str, int | None, int | None]]`): ``(path, width, height)`` per image; the path as
            the sandbox receives it, the size ORIGINAL (None: "Unable to determine").

    Example:
        >>> text = user_prompt_images("Same car?", [("/a.jpg", 640, 480), ("/b.jpg", 320, 240)])
        >>> [line for line in text.splitlines() if line.startswith("### User")][2]
        '### User Image Path:** "/b.jpg"'
    """
    if not images:
        raise ValueError("user_prompt_images needs at least one image")
    lines = "".join(_IMAGE_LINES.format(path=path, size=image_size_text(w, h)) for path, w, h in images)
    return _USER_TEMPLATE.format(question=question, image_lines=lines)


def user_text_item(prompt: str, *, eval_image_quirk: bool = False) -> str:
    """The text item that follows the image item in the user message.

    Training replaced the leading ``<image>`` by the vision block, so the text continues with ``\\n<question>``
    (the default). The official HF eval kept the literal ``<image>\\n`` after the vision block; set
    ``eval_image_quirk`` to reproduce it for score parity (reference 1.2 "Where <image> goes").
    """
    if eval_image_quirk or not prompt.startswith(IMAGE_PLACEHOLDER):
        return prompt
    return prompt[len(IMAGE_PLACEHOLDER) :]


def fallback_prompt(question: str) -> str:
    """The user text of the plain fallback conversation, run once after every attempt failed (reference 1.2)."""
    return _FALLBACK_TEMPLATE.replace("{question}", question)


def format_mcq(question: str, options: Mapping[str, str], hint: str | None = None) -> str:
    """Formats a multiple-choice question as VLMEvalKit's Thyme MCQ prompt (MME-RealWorld included).

    Args:
        question (`str`): the question text.
        options (`Mapping[str, str]`): letter -> option text, in display order.
        hint (`str`, *optional*): a ``Hint:`` line placed first.

    Example:
        >>> print(format_mcq("Which?", {"A": "x", "B": "y"}))
        Question: Which?
        Options:
        A. x
        B. y
        Please select the correct answer from the options above.
    """
    prompt = f"Hint: {hint}\n" if hint is not None else ""
    prompt += f"Question: {question}\n"
    if options:
        prompt += "Options:\n" + "".join(f"{key}. {value}\n" for key, value in options.items())
        prompt += MCQ_INSTRUCTION_CJK if _CJK_RE.search(prompt) else MCQ_INSTRUCTION
    return prompt.rstrip()


def format_yes_no(question: str, *, add_instruction: bool = True) -> str:
    """Y/N benchmarks: the question plus " Please answer yes or no." (VLMEvalKit leaves it off for MME)."""
    return question + YES_NO_INSTRUCTION if add_instruction else question


def format_vqa(question: str, *, add_instruction: bool = True) -> str:
    """Open VQA: the question plus the short-answer line (VLMEvalKit leaves it off for MMVet)."""
    return question + VQA_INSTRUCTION if add_instruction else question


__all__ = [
    "FALLBACK_SYSTEM_PROMPT",
    "SIZE_UNKNOWN",
    "SYSTEM_PROMPT",
    "SYSTEM_PROMPT_SHA256",
    "fallback_prompt",
    "format_mcq",
    "format_vqa",
    "format_yes_no",
    "image_size_text",
    "user_prompt",
    "user_prompt_images",
    "user_text_item",
]
