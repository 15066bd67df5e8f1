"""The Thyme message protocol: every tag, stop string and parsing rule, spelled in this one place.

The released weights (Kwai-Keye/Thyme-RL, Thyme-SFT) write one assistant message per trajectory::

    <think>... <code>
    ```python
    ...
    ```
    </code><sandbox_output>IMAGES or TEXT</sandbox_output> ... </think>
    <answer>...</answer>

Generation stops at ``</code>`` and ``</answer>`` (and at the end of the turn); the loop runs the code and appends
``<sandbox_output>...</sandbox_output>`` with no added whitespace, inside the same assistant message
(thyme-reference.md sections 1.4-1.6 and 7).
"""

from __future__ import annotations

import re

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
ANSWER_OPEN = "<answer>"
ANSWER_CLOSE = "</answer>"
CODE_OPEN = "<code>"
CODE_CLOSE = "</code>"
SANDBOX_OUTPUT_OPEN = "<sandbox_output>"
SANDBOX_OUTPUT_CLOSE = "</sandbox_output>"
# The literal the official user template starts with; training replaced it by the vision block (reference 1.2).
IMAGE_PLACEHOLDER = "<image>"

# What a generation call stops at (besides the end of the turn), as the original eval (reference 1.3).
STOP_STRINGS: tuple[str, ...] = (CODE_CLOSE, ANSWER_CLOSE)
# ATS splits a code round into two calls: prose (sampled) stops at <code>, then code (greedy) stops at </code>
# (reference 3.2).
ATS_PROSE_STOP_STRINGS: tuple[str, ...] = (CODE_OPEN, CODE_CLOSE, ANSWER_CLOSE)
ATS_CODE_STOP_STRINGS: tuple[str, ...] = (CODE_CLOSE,)

# What the original returns when the final text has no answer tag (reference 1.6); the evaluator scores it as wrong.
MISSING_ANSWER = "No answer tag found in the final output."

# Fence-tolerant, case-insensitive, non-greedy; the first match counts (reference 1.5). Unlike the original we also
# accept ```py and ```python3 fences: the original left "py" as the first code line, which then died with a
# NameError, so accepting it only turns a certain failure into the code the model meant. The language tag must end
# at a word boundary so that a body starting with e.g. "pyplot" after a bare fence is kept whole.
CODE_BLOCK_RE = re.compile(
    r"<code>\s*(?:```(?:(?:python3|python|py)\b)?)?(.*?)\s*(?:```)?\s*</code>",
    re.IGNORECASE | re.DOTALL,
)
ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_BOXED = "\\boxed{"
# Markdown emphasis the released model wraps answers in ("<answer> **C. S QT 911** </answer>", reference 1.6).
_EMPHASIS_MARKERS = ("**", "__", "*", "_")


def extract_code(text: str) -> str | None:
    """Returns the stripped body of the first ``<code>...</code>`` block in ``text``, or None.

    Example:
        >>> extract_code("look <code>\\n```python\\nprint(1)\\n```\\n</code>")
        'print(1)'
    """
    match = CODE_BLOCK_RE.search(text)
    return match.group(1).strip() if match else None


def unwrap_boxed(text: str) -> str:
    """Returns the brace-balanced content of the LAST ``\\boxed{...}`` in ``text``, or ``text`` when there is none
    (or when its braces never close).

    Example:
        >>> unwrap_boxed("so \\\\boxed{\\\\frac{1}{2}}")
        '\\\\frac{1}{2}'
    """
    start = text.rfind(_BOXED)
    if start < 0:
        return text
    depth, begin = 1, start + len(_BOXED)
    for index in range(begin, len(text)):
        if text[index] == "{":
            depth += 1
        elif text[index] == "}":
            depth -= 1
            if depth == 0:
                return text[begin:index]
    return text


def strip_emphasis(text: str) -> str:
    """Removes one markdown emphasis pair wrapping the whole answer (``**C. S QT 911**`` -> ``C. S QT 911``)."""
    for marker in _EMPHASIS_MARKERS:
        if len(text) > 2 * len(marker) and text.startswith(marker) and text.endswith(marker):
            return text[len(marker) : -len(marker)].strip()
    return text


def extract_answer(text: str, *, strip_markdown: bool = True) -> str | None:
    """Parses the final answer from assistant text: the FIRST ``<answer>...</answer>``, stripped, with ``\\boxed{}``
    unwrapped (reference 1.6).

    Unlike the original we also drop one markdown emphasis pair around the whole answer (``strip_markdown``):
    the released model writes ``<answer> **C. S QT 911** </answer>`` and a user asking a question wants
    ``C. S QT 911``. Rule-based matchers (VLMEvalKit's letter matcher) are unaffected by the change.

    Args:
        text (`str`): assistant text; sandbox outputs may be included (they never contain answer tags).
        strip_markdown (`bool`, defaults to `True`): remove a wrapping ``**``/``__``/``*``/``_`` pair.

    Returns:
        `str | None`: the answer, or None when there is no complete answer tag (callers use :data:`MISSING_ANSWER`).

    Example:
        >>> extract_answer("</think>\\n<answer> **C. S QT 911** </answer>")
        'C. S QT 911'
    """
    match = ANSWER_RE.search(text)
    if match is None:
        return None
    answer = unwrap_boxed(match.group(1).strip()).strip()
    return strip_emphasis(answer) if strip_markdown else answer


def truncate_after_first(text: str, closing_tag: str) -> str:
    """Cuts ``text`` right after the first ``closing_tag`` (a backend that ignored its stop string, or a model that
    wrote two answers: only the first counts, as the original cut its final content after the first </answer>)."""
    index = text.find(closing_tag)
    return text if index < 0 else text[: index + len(closing_tag)]


def wrap_answer(text: str) -> str:
    """Wraps a fallback reply that lacks answer tags, as the original did (reference 1.4 step 3)."""
    return text if ANSWER_RE.search(text) else f"{ANSWER_OPEN}{text}{ANSWER_CLOSE}"


__all__ = [
    "ANSWER_CLOSE",
    "ANSWER_OPEN",
    "ANSWER_RE",
    "ATS_CODE_STOP_STRINGS",
    "ATS_PROSE_STOP_STRINGS",
    "CODE_BLOCK_RE",
    "CODE_CLOSE",
    "CODE_OPEN",
    "IMAGE_PLACEHOLDER",
    "MISSING_ANSWER",
    "SANDBOX_OUTPUT_CLOSE",
    "SANDBOX_OUTPUT_OPEN",
    "STOP_STRINGS",
    "THINK_CLOSE",
    "THINK_OPEN",
    "extract_answer",
    "extract_code",
    "strip_emphasis",
    "truncate_after_first",
    "unwrap_boxed",
    "wrap_answer",
]
