"""Rule-based answer matching, the way VLMEvalKit scores multiple choice, yes/no and short answers.

VLMEvalKit first looks for an option letter in the prediction, then for the text of exactly one option, and only
then (optionally) asks an LLM judge. These are the two rule stages, so scores need no API key; predictions that no
rule resolves count as wrong and are marked ``extracted=None`` in the predictions file, so a user can count how many
a judge could rescue. The judge stage, when asked for, is :mod:`thyme.evaluation.judging`. Released Thyme outputs
carry markdown and both letter and text (``<answer> **C. S QT 911** </answer>``, reference section 1.6), which
these rules resolve to ``C``.

The input is the answer text already taken out of ``<answer>...</answer>`` (see :mod:`thyme.protocol`).
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from thyme.evaluation.datasets import EvalItem

# Markdown, quotes and markup models put around an answer: **C**, `C`, ### C, "C", and XML-style tags left in a
# reply that was never closed (a direct reply cut at max_new_tokens: "<think>...</think> <answer>C").
_DECORATION = re.compile(r"</?[A-Za-z_]+>|[*`#\"“”]+")
# Lead-ins such as "Answer: C", "The answer is (C)", "Option C".
_LEAD_IN = re.compile(
    r"^(?:the\s+)?(?:correct\s+|final\s+)?(?:answer|option|choice)(?:\s+is)?\s*[:：]?\s*", re.IGNORECASE
)
# A letter that opens the answer and is delimited as a label: "C", "C.", "(C)", "C)", "C:", "[C]", and the full-width
# forms Chinese answers use ("（C）", "C。", "C：") for MME-RealWorld-CN.
_LEADING_LABEL = re.compile(r"^[(\[（]?([A-Z])(?:[)\].:,）。：，、]|\s*$)")
# VLMEvalKit splits on these characters before looking for a standalone option letter.
_SPLIT_CHARS = ".()[],:;!*#{}"
# VLMEvalKit accepts a lone letter only near the end of a long answer ("... so the answer is C"); a capital near the
# start of a long sentence is more likely a word ("A man is ...").
_LETTER_WINDOW = 5
_ARTICLES = {"a", "an", "the"}
_NUMBER_WORDS = {
    "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_PUNCTUATION = str.maketrans({c: " " for c in string.punctuation if c not in ".-"})


@dataclass(frozen=True)
class MatchResult:
    """The outcome of scoring one prediction.

    Args:
        extracted: what the rules read from the prediction (an option letter, ``yes``/``no``, or the normalised
            text), or None when no rule resolved it (VLMEvalKit would ask a judge here).
        correct: whether ``extracted`` equals the ground truth.
    """

    extracted: str | None
    correct: bool


def _strip_decoration(text: str) -> str:
    return _LEAD_IN.sub("", _DECORATION.sub("", text).strip()).strip()


def match_option(prediction: str, options: Mapping[str, str]) -> str | None:
    """Returns the option letter a prediction picks, or None when it picks none or several.

    Args:
        prediction: the model's answer text, markdown allowed.
        options: option letter -> option text.

    Example:
        >>> match_option("**C. S QT 911**", {"A": "S OT 911", "B": "S TQ 119", "C": "S QT 911"})
        'C'
        >>> match_option("The plate reads S TQ 119.", {"A": "S OT 911", "B": "S TQ 119"})
        'B'
    """
    text = _strip_decoration(prediction)
    label = _LEADING_LABEL.match(text)
    if label and label.group(1) in options:
        return label.group(1)
    letter = _standalone_letter(text, options)
    if letter is not None:
        return letter
    return _option_by_text(text, options)


def _standalone_letter(text: str, options: Mapping[str, str]) -> str | None:
    words = text.translate(str.maketrans({c: " " for c in _SPLIT_CHARS})).split()
    found = [letter for letter in options if letter in words]
    if len(found) != 1:
        return None
    position = len(words) - 1 - words[::-1].index(found[0])
    return found[0] if position >= len(words) - _LETTER_WINDOW else None


def _option_by_text(text: str, options: Mapping[str, str]) -> str | None:
    normal = normalize_answer(text)
    texts = {letter: normalize_answer(option) for letter, option in options.items()}
    exact = [letter for letter, option in texts.items() if option and option == normal]
    if len(exact) == 1:
        return exact[0]
    contained = [letter for letter, option in texts.items() if option and _contains_phrase(normal, option)]
    # "upper left" also contains "left": keep only candidates that are not part of a longer candidate.
    maximal = [a for a in contained if not any(a != b and texts[a] in texts[b] for b in contained)]
    return maximal[0] if len(maximal) == 1 else None


def _contains_phrase(text: str, phrase: str) -> bool:
    return re.search(rf"(?:^|\s){re.escape(phrase)}(?:$|\s)", text) is not None


def match_yes_no(prediction: str) -> str | None:
    """Returns ``"yes"`` or ``"no"`` when the prediction says exactly one of them (VLMEvalKit's Y/N rule), else None.

    Example:
        >>> match_yes_no("**Yes**, the light is on.")
        'yes'
    """
    words = set(normalize_answer(prediction).split())
    if ("yes" in words) == ("no" in words):
        return None
    return "yes" if "yes" in words else "no"


def normalize_answer(text: str) -> str:
    """Normalises a short answer for exact match: lower case, no markdown or punctuation, no articles, digits.

    This follows the VQA-style normalisation the field uses for short answers, so ``"The Red."`` equals ``"red"``
    and ``"two"`` equals ``"2"``; decimal points inside numbers survive.

    Example:
        >>> normalize_answer("**The Red** car.")
        'red car'
    """
    text = _DECORATION.sub("", text).lower().translate(_PUNCTUATION)
    text = re.sub(r"(?<!\d)\.|\.(?!\d)", " ", text)  # a period that is not a decimal point
    words = [_NUMBER_WORDS.get(word, word) for word in text.split() if word not in _ARTICLES]
    return " ".join(words)


def match_short_answer(prediction: str, answers: Sequence[str]) -> bool:
    """Whether the normalised prediction equals any normalised accepted answer."""
    normal = normalize_answer(_LEAD_IN.sub("", prediction.strip()))
    return any(normal == normalize_answer(answer) for answer in answers)


def score_prediction(item: EvalItem, prediction: str | None) -> MatchResult:
    """Scores one prediction against an item by its question type (MCQ, yes/no or short answer).

    Args:
        item: the benchmark question.
        prediction: the answer text, or None when the model gave no answer at all (scored wrong).

    Returns:
        What the rules extracted and whether it is correct.
    """
    if prediction is None:
        return MatchResult(extracted=None, correct=False)
    kind = item.question_type
    if kind == "mcq":
        letter = match_option(prediction, item.options)
        return MatchResult(extracted=letter, correct=letter == item.answer)
    if kind == "yes_no":
        said = match_yes_no(prediction)
        return MatchResult(extracted=said, correct=said == item.answer.strip().lower())
    answers = (item.answer, *item.extra_answers)
    return MatchResult(extracted=normalize_answer(prediction), correct=match_short_answer(prediction, answers))
