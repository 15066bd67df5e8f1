"""VLMEvalKit-style matching on answer styles real models write."""

from __future__ import annotations

import pytest

from thyme.evaluation.datasets import EvalItem
from thyme.evaluation.matching import match_option, match_yes_no, normalize_answer, score_prediction
from thyme.protocol import extract_answer

PLATE_OPTIONS = {
    "A": "S OT 911",
    "B": "S TQ 119",
    "C": "S QT 911",
    "D": "B QT 119",
    "E": "This image doesn't feature the plate number.",
}


@pytest.mark.parametrize(
    ("prediction", "letter"),
    [
        ("C", "C"),
        ("C.", "C"),
        ("(C)", "C"),
        ("**C. S QT 911**", "C"),  # the released model's README answer, after <answer> extraction
        (" **C. S QT 911** ", "C"),
        ("C. S QT 911", "C"),
        ("S QT 911", "C"),  # option text only
        ("The answer is C.", "C"),
        ("Answer: (B)", "B"),
        ("The plate reads S TQ 119 in the crop.", "B"),
        ("After zooming in, the best option is D", "D"),
        ("`A`", "A"),
        ("### E", "E"),
        ("<think>Easy.</think>\n<answer>B", "B"),  # a direct reply cut before </answer>
        ("（C）", "C"),  # full-width forms (MME-RealWorld-CN answers)
        ("C。", "C"),
    ],
)
def test_match_option_reads_real_answer_styles(prediction: str, letter: str) -> None:
    assert match_option(prediction, PLATE_OPTIONS) == letter


def test_match_option_on_full_released_output_via_protocol() -> None:
    text = "<think>The crop shows the plate clearly.</think>\n<answer> **C. S QT 911** </answer>"
    assert match_option(extract_answer(text), PLATE_OPTIONS) == "C"


@pytest.mark.parametrize(
    "prediction",
    [
        "A or B",  # two letters: ambiguous
        "I cannot tell.",
        "A man stands near the car, the plate is unreadable",  # "A" is an article far from the end
    ],
)
def test_match_option_refuses_ambiguous_or_missing_choices(prediction: str) -> None:
    assert match_option(prediction, PLATE_OPTIONS) is None


def test_match_option_prefers_the_longer_option_text() -> None:
    options = {"A": "left", "B": "upper left", "C": "right"}
    assert match_option("It is in the upper left corner", options) == "B"
    assert match_option("on the left", options) == "A"


@pytest.mark.parametrize(
    ("prediction", "said"),
    [("Yes", "yes"), ("**No.**", "no"), ("yes, it is red", "yes"), ("Yes and no", None), ("maybe", None)],
)
def test_match_yes_no(prediction: str, said: str | None) -> None:
    assert match_yes_no(prediction) == said


def test_normalize_answer_handles_case_articles_punctuation_and_number_words() -> None:
    assert normalize_answer("The RED.") == "red"
    assert normalize_answer("**two** apples!") == "2 apples"
    assert normalize_answer("3.5 m") == "3.5 m"


def test_score_prediction_by_question_type() -> None:
    mcq = EvalItem(index="1", question="q", answer="C", options=PLATE_OPTIONS)
    assert score_prediction(mcq, "**C. S QT 911**").correct
    assert not score_prediction(mcq, "A").correct
    yes_no = EvalItem(index="2", question="q", answer="Yes")
    assert score_prediction(yes_no, "yes.").correct
    vqa = EvalItem(index="3", question="q", answer="maple", extra_answers=("maple leaf",))
    result = score_prediction(vqa, "The word is MAPLE")
    assert (result.extracted, result.correct) == ("word is maple", False)  # exact match, not containment
    assert score_prediction(vqa, "**Maple**").correct
    assert score_prediction(vqa, "Maple leaf.").correct
    assert score_prediction(vqa, None) == score_prediction(vqa, None)
    assert not score_prediction(vqa, None).correct
