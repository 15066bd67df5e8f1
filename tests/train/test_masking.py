"""The loss-mask rules on text and offsets (no tokenizer): which characters and tokens of a Thyme response train."""

from __future__ import annotations

import pytest

from thyme.errors import ProtocolError
from thyme.protocol import SANDBOX_OUTPUT_CLOSE, SANDBOX_OUTPUT_OPEN
from thyme.train.masking import expand_spans, find_sandbox_spans, token_mask_from_spans, trained_char_spans

BLOCK_1 = f"{SANDBOX_OUTPUT_OPEN}<|vision_start|><|image_pad|><|vision_end|>{SANDBOX_OUTPUT_CLOSE}"
BLOCK_2 = f"{SANDBOX_OUTPUT_OPEN}Sandbox for 3: NameError{SANDBOX_OUTPUT_CLOSE}"
BLOCK_3 = f"{SANDBOX_OUTPUT_OPEN}42{SANDBOX_OUTPUT_CLOSE}"
PROMPT = "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"


def _pieces(text: str, spans: list[tuple[int, int]]) -> list[str]:
    return [text[start:end] for start, end in spans]


def test_find_sandbox_spans_covers_tags_images_and_text_results() -> None:
    text = "a" + BLOCK_1 + "b" + BLOCK_2 + "c"
    assert _pieces(text, find_sandbox_spans(text)) == [BLOCK_1, BLOCK_2]


def test_find_sandbox_spans_rejects_unclosed_block() -> None:
    with pytest.raises(ProtocolError, match=r"<sandbox_output> at character 1 never closes"):
        find_sandbox_spans("a" + SANDBOX_OUTPUT_OPEN + "x")


def test_find_sandbox_spans_rejects_stray_closing_tag() -> None:
    with pytest.raises(ProtocolError, match=r"</sandbox_output> at character 2 has no <sandbox_output> before it"):
        find_sandbox_spans("ab" + SANDBOX_OUTPUT_CLOSE)


@pytest.mark.parametrize(
    ("last_round_only", "mask_sandbox_output", "expected"),
    [
        # Default (the original SFT): rounds 1-2 masked entirely, the last block masked, rest trained.
        (True, True, ["round3", "answer<|im_end|>"]),
        # Every round trained, every sandbox block masked (RL rule, and the paper's "+ Mask Sandbox" row).
        (False, True, ["round1", "round2", "round3", "answer<|im_end|>"]),
        # Naive SFT: the whole response, sandbox output included.
        (False, False, ["round1" + BLOCK_1 + "round2" + BLOCK_2 + "round3" + BLOCK_3 + "answer<|im_end|>"]),
        # Last round only without the sandbox mask: the last block is trained too.
        (True, False, ["round3" + BLOCK_3 + "answer<|im_end|>"]),
    ],
)
def test_trained_char_spans_switches(last_round_only: bool, mask_sandbox_output: bool, expected: list[str]) -> None:
    response = "round1" + BLOCK_1 + "round2" + BLOCK_2 + "round3" + BLOCK_3 + "answer<|im_end|>"
    text = PROMPT + response + "\n"
    spans = trained_char_spans(
        text,
        (len(PROMPT), len(text) - 1),
        last_round_only=last_round_only,
        mask_sandbox_output=mask_sandbox_output,
    )
    assert _pieces(text, spans) == expected


def test_trained_char_spans_single_round_trains_code_and_answer() -> None:
    response = "look <code>x</code>" + BLOCK_1 + "done <answer>A</answer>"
    text = PROMPT + response
    spans = trained_char_spans(text, (len(PROMPT), len(text)))
    assert _pieces(text, spans) == ["look <code>x</code>", "done <answer>A</answer>"]


def test_trained_char_spans_ignores_sandbox_tags_in_the_prompt() -> None:
    # A user who quotes the tags in a question does not shift the response's rounds.
    prompt = "user says " + BLOCK_2 + " assistant:"
    text = prompt + "r1" + BLOCK_1 + "r2" + BLOCK_3 + "end"
    spans = trained_char_spans(text, (len(prompt), len(text)))
    assert _pieces(text, spans) == ["r2", "end"]


def test_token_mask_trains_tokens_that_straddle_a_boundary() -> None:
    text = "ab</code><sandbox_output>zz</sandbox_output>cd"
    spans = trained_char_spans(text, (0, len(text)))
    # Tokens: "ab", "</code" , "><" (straddles), "sandbox_output", ">", "zz", "</sandbox_output", ">c" (straddles), "d"
    cuts = [0, 2, 8, 10, 24, 25, 27, 43, 45, 46]
    offsets = list(zip(cuts, cuts[1:], strict=False))
    tokens = [text[start:end] for start, end in offsets]
    mask = token_mask_from_spans(offsets, spans)
    trained = [token for token, flag in zip(tokens, mask, strict=True) if flag]
    assert trained == ["ab", "</code", "><", ">c", "d"]


def test_token_mask_never_trains_padding() -> None:
    assert token_mask_from_spans([(0, 3), (0, 0), (0, 0)], [(0, 3)]) == [True, False, False]


def test_expand_spans_follows_image_expansion() -> None:
    pad = "<|image_pad|>"
    text = "u" + pad + "|r1" + pad + "|r2"
    expanded = "u" + pad * 4 + "|r1" + pad * 2 + "|r2"
    replacements = [
        {"span": (1, 14), "new_span": (1, 53)},
        {"span": (17, 30), "new_span": (56, 82)},
    ]
    spans = [(text.index("|r1"), text.index("|r1") + 3), (text.index("|r2"), len(text))]
    assert _pieces(expanded, expand_spans(spans, replacements)) == ["|r1", "|r2"]
