"""Thyme's rewards as plain functions with TRL's reward signature (thyme-reference.md section 3.4).

The original sums three weighted rewards, with the consistency reward zeroed when the answer is wrong::

    r = accuracy_weight * acc + consistency_weight * acc * consistency + format_weight * format   (1, 0.5, 0.5)

TRL multiplies each reward function's output by ``args.reward_weights`` and sums them, so the dependency of
consistency on accuracy lives inside :func:`make_consistency_reward` (it returns ``acc * consistency``), and the
weights go to ``reward_weights``. Each function takes ``completions`` plus the dataset columns as keyword arguments
(``solution``, ``question``) and returns one float (or None = not scored) per completion; users add their own
function with the same signature.

Accuracy is decided by rules first (option letters, numbers, normalised strings, math-verify where installed) and
only then, when one is configured, by an LLM judge behind any OpenAI-compatible endpoint. Without a judge,
consistency is not scored (None, which TRL leaves out of the sum).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from thyme.evaluation.matching import match_option, match_short_answer
from thyme.judge import Judge
from thyme.protocol import (
    ANSWER_CLOSE,
    ANSWER_OPEN,
    IMAGE_PLACEHOLDER,
    SANDBOX_OUTPUT_CLOSE,
    SANDBOX_OUTPUT_OPEN,
    THINK_CLOSE,
    THINK_OPEN,
    extract_answer,
)

RewardFunc = Callable[..., list[float | None]]

# The original judged consistency on the last 500 characters of the reasoning (agent_rm.py CSTORM).
CONSISTENCY_CONTEXT_CHARS = 500
NUMBER_REL_TOLERANCE = 1e-4
_OPTION_LINE = re.compile(r"^\s*\(?([A-Z])[.):]\s*(.+?)\s*$", re.MULTILINE)
_LETTER_SOLUTION = re.compile(r"^\s*\(?([A-Z])\)?\.?\s*$")
_NUMBER = re.compile(r"^[-+]?(?:\d+(?:,\d{3})*(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?$")
_SANDBOX_BLOCK = re.compile(re.escape(SANDBOX_OUTPUT_OPEN) + r".*?" + re.escape(SANDBOX_OUTPUT_CLOSE), re.DOTALL)
# The strict format check of agent_rm.py format_check: one </think>, exactly ONE whitespace character, then the answer
# at the very end; </think><answer> and </think>\n\n<answer> both fail.
_STRICT_FORMAT = re.compile(
    rf"(?:(?!{re.escape(THINK_CLOSE)}).)*{re.escape(THINK_CLOSE)}\s{re.escape(ANSWER_OPEN)}.*{re.escape(ANSWER_CLOSE)}",
    re.DOTALL,
)

CORRECTNESS_PROMPT = (
    "You are grading an answer to a question about an image.\n"
    "Question: {question}\nReference answer: {reference}\nGenerated answer: {answer}\n"
    'Does the generated answer agree with the reference answer? Reply with JSON only: {{"Correctness": 1}} if it '
    'does, {{"Correctness": 0}} if it does not.'
)
CONSISTENCY_PROMPT = (
    "You are checking whether a final answer follows from the reasoning before it.\n"
    "Question: {question}\nEnd of the reasoning: {reasoning}\nFinal answer: {answer}\n"
    'Does the reasoning reach the same conclusion as the final answer? Reply with JSON only: {{"Consistency": 1}} '
    'if it does, {{"Consistency": 0}} if it does not.'
)


def completion_text(completion: str | list[dict]) -> str:
    """Returns the assistant text of one TRL completion (a string, or a conversational list of messages)."""
    if isinstance(completion, str):
        return completion
    parts = []
    for message in completion:
        content = message["content"]
        parts.append(content if isinstance(content, str) else "".join(c.get("text", "") for c in content))
    return "".join(parts)


def reference_answer(solution: str) -> str:
    """The reference answer of a dataset row: Thyme-RL solutions may wrap it in ``<answer>`` tags."""
    inside = extract_answer(solution)
    return (inside if inside is not None else solution).strip()


def parse_options(question: str) -> dict[str, str]:
    """Reads ``A. text`` / ``(B) text`` option lines from a multiple-choice question."""
    return {letter: text for letter, text in _OPTION_LINE.findall(question)}


def _as_number(text: str) -> float | None:
    cleaned = text.strip().rstrip(".").replace(",", "")
    return float(cleaned) if _NUMBER.match(text.strip().rstrip(".")) else None


def _math_verify_match(answer: str, reference: str) -> bool:
    try:
        from math_verify import parse, verify
    except ImportError:  # optional: pip install math-verify
        return False
    return bool(verify(parse(reference), parse(answer)))


def rule_match(answer: str, reference: str, question: str = "") -> bool:
    """Whether ``answer`` matches ``reference`` by rules alone.

    A single-letter reference is a multiple-choice key: the answer must pick that option (by its letter or its
    text, VLMEvalKit's rules). Otherwise numbers compare numerically, strings after VQA normalisation, and
    math-verify (when installed) decides equivalent expressions.

    Example:
        >>> rule_match("**C. S QT 911**", "C", "A. S OT 911\\nC. S QT 911")
        True
        >>> rule_match("3.50", "3.5")
        True
    """
    letter = _LETTER_SOLUTION.match(reference)
    if letter:
        options = parse_options(question) or {letter.group(1): letter.group(1)}
        return match_option(answer, options) == letter.group(1)
    got, want = _as_number(answer), _as_number(reference)
    if got is not None and want is not None:
        return abs(got - want) <= NUMBER_REL_TOLERANCE * max(1.0, abs(want))
    return match_short_answer(answer, [reference]) or _math_verify_match(answer, reference)


def format_ok(text: str) -> bool:
    """The original's strict format check: one each of the four think/answer tags, ``</think>``, ONE whitespace
    character, and ``<answer>...</answer>`` at the very end (sandbox blocks and image placeholders allowed)."""
    tags = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)
    return all(text.count(tag) == 1 for tag in tags) and _STRICT_FORMAT.fullmatch(text) is not None


def reasoning_tail(text: str, chars: int = CONSISTENCY_CONTEXT_CHARS) -> str:
    """The last ``chars`` characters of the reasoning, sandbox blocks and image placeholders removed."""
    reasoning = text.split(THINK_CLOSE, 1)[0].replace(THINK_OPEN, "")
    reasoning = _SANDBOX_BLOCK.sub("", reasoning).replace(IMAGE_PLACEHOLDER, "")
    return reasoning[-chars:].strip()


def _column(kwargs: dict[str, Any], name: str, size: int) -> list[str]:
    values = kwargs.get(name)
    if values is None:
        return [""] * size
    return [str(v) if v is not None else "" for v in values]


def make_accuracy_reward(judge: Judge | None = None) -> RewardFunc:
    """Builds ``accuracy_reward``: 1.0 when the first ``<answer>`` matches ``solution`` by rules or, failing the
    rules, by the judge; 0.0 otherwise (no or empty answer included).

    The scores of the last batch are remembered on the function (``.last_scores``, keyed by the identity of the
    ``completions`` list TRL hands every reward function of one step) so the consistency reward of the same batch
    reuses them instead of asking the judge twice.
    """

    def accuracy_reward(completions: Sequence, solution: Sequence[str], **kwargs: Any) -> list[float | None]:
        questions = _column(kwargs, "question", len(completions))
        # The question as shown to the model carries the options the letter refers to (a raw question may not).
        shown = _column(kwargs, "prompt_question", len(completions))
        scores: list[float | None] = []
        to_judge: dict[int, str] = {}
        for index, (completion, sol, question, options) in enumerate(
            zip(completions, solution, questions, shown, strict=True)
        ):
            answer = extract_answer(completion_text(completion))
            reference = reference_answer(sol)
            matched = bool(answer) and rule_match(answer, reference, options or question)
            scores.append(1.0 if matched else 0.0)
            if answer and not matched and judge is not None:
                to_judge[index] = CORRECTNESS_PROMPT.format(question=question, reference=reference, answer=answer)
        if to_judge:
            for index, flag in zip(to_judge, judge.flags(list(to_judge.values()), "Correctness"), strict=True):
                scores[index] = flag
        accuracy_reward.last_scores = (id(completions), list(scores))
        return scores

    accuracy_reward.last_scores = (None, [])
    return accuracy_reward


def make_consistency_reward(accuracy: RewardFunc, judge: Judge | None) -> RewardFunc:
    """Builds ``consistency_reward``: ``acc * consistency``, with consistency asked of the judge; None (not scored)
    for every completion when there is no judge."""

    def consistency_reward(completions: Sequence, solution: Sequence[str], **kwargs: Any) -> list[float | None]:
        if judge is None:
            return [None] * len(completions)
        batch_id, acc = accuracy.last_scores
        if batch_id != id(completions):
            acc = accuracy(completions, solution, **kwargs)
        questions = _column(kwargs, "question", len(completions))
        scores: list[float | None] = [0.0] * len(completions)
        to_judge: dict[int, str] = {}
        for index, (completion, correct, question) in enumerate(zip(completions, acc, questions, strict=True)):
            if correct:
                text = completion_text(completion)
                to_judge[index] = CONSISTENCY_PROMPT.format(
                    question=question, reasoning=reasoning_tail(text), answer=extract_answer(text) or ""
                )
        for index, flag in zip(to_judge, judge.flags(list(to_judge.values()), "Consistency"), strict=True):
            scores[index] = flag
        return scores

    return consistency_reward


def format_reward(completions: Sequence, **kwargs: Any) -> list[float | None]:
    """1.0 when the whole assistant message passes the original's strict format check, else 0.0."""
    return [1.0 if format_ok(completion_text(c)) else 0.0 for c in completions]


def make_thyme_rewards(judge: Judge | None = None) -> list[RewardFunc]:
    """The original's three rewards, in the order of :func:`thyme_reward_weights`: accuracy, consistency, format."""
    accuracy = make_accuracy_reward(judge)
    return [accuracy, make_consistency_reward(accuracy, judge), format_reward]


def thyme_reward_weights(accuracy_weight: float, consistency_weight: float, format_weight: float) -> list[float]:
    """TRL ``reward_weights`` for :func:`make_thyme_rewards`, so the sum is the original's combined reward."""
    return [accuracy_weight, consistency_weight, format_weight]
