"""Code-block and answer parsing (reference 1.5, 1.6)."""

from __future__ import annotations

import pytest

from thyme.protocol import MISSING_ANSWER, extract_answer, extract_code, truncate_after_first, unwrap_boxed


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("<code>\n```python\nprint(1)\n```\n</code>", "print(1)"),
        ("<CODE>```Python\nprint(1)```</Code>", "print(1)"),
        ("<code>\nprint(1)\n</code>", "print(1)"),
        ("<code>\n```py\nprint(1)\n```\n</code>", "print(1)"),  # the original left "py" as a first code line
        ("<code>\n```python3\nx = 2\n```\n</code>", "x = 2"),
        ("<code>\n```\npyplot = 1\n```\n</code>", "pyplot = 1"),  # a bare fence keeps a body starting with "py"
        ("a <code>```python\nfirst()```</code> b <code>```python\nsecond()```</code>", "first()"),
    ],
)
def test_extract_code(text, code):
    assert extract_code(text) == code


def test_extract_code_needs_a_closed_block():
    assert extract_code("<code>\n```python\nprint(1)\n```") is None
    assert extract_code("no code here </code>") is None


def test_extract_answer_readme_style_strips_markdown():
    text = "option C. S QT 911.</think>\n<answer> **C. S QT 911** </answer>"
    assert extract_answer(text) == "C. S QT 911"
    assert extract_answer(text, strip_markdown=False) == "**C. S QT 911**"


def test_extract_answer_first_tag_counts():
    assert extract_answer("<answer>A</answer> then <answer>B</answer>") == "A"


def test_extract_answer_unwraps_last_boxed_with_nested_braces():
    assert extract_answer(r"<answer>x=\boxed{1} so \boxed{\frac{1}{2}}</answer>") == r"\frac{1}{2}"
    assert unwrap_boxed(r"\boxed{unclosed") == r"\boxed{unclosed"


def test_extract_answer_missing():
    assert extract_answer("<answer>never closed") is None
    assert MISSING_ANSWER == "No answer tag found in the final output."


def test_truncate_after_first():
    assert truncate_after_first("a</answer>b</answer>", "</answer>") == "a</answer>"
    assert truncate_after_first("abc", "</answer>") == "abc"
