"""Which tokens of a Thyme conversation are trained: sandbox output never, earlier rounds optionally not.

The assistant message of a Thyme trajectory holds text the MODEL wrote and text the SANDBOX wrote
(``<sandbox_output>IMAGES or TEXT</sandbox_output>``, appended by the loop). Training on the sandbox's part teaches the
model to predict tool output itself; the paper's ablation (thyme-reference.md section 5, Table 5) measured that
"naive SFT" loses 6 points on HallusionBench, and masking the sandbox spans, then training only the last round, is
what made Thyme-SFT. The original did this in ms-swift's template (reference 3.3):

- every image placeholder, both tag strings and the text result/error between them get loss weight 0 (SFT and RL);
- SFT "last round only": when a response holds two or more ``</sandbox_output>``, everything up to and including
  the second-to-last one gets weight 0, so what is learned is the last code round plus the answer.

Here the rule is written once, on characters, and then carried to tokens through the tokenizer's offset mapping:

1. :func:`find_sandbox_spans` / :func:`trained_char_spans` work on the rendered chat text (``<|image_pad|>`` not yet
   expanded), so they need no tokenizer;
2. :func:`expand_spans` moves those character spans into the processor's expanded text, using the
   ``text_replacement_offsets`` the processor reports for each image (one ``<|image_pad|>`` becomes ``n`` of them);
3. :func:`token_mask_from_spans` marks each token whose offset range overlaps a trained span.

Working on characters keeps the labels true to the token sequence the model really sees: the whole string is
tokenized as at inference, instead of tokenizing chunk by chunk as swift did. A BPE token can straddle a boundary
(Qwen's pre-tokenizer keeps ``></`` style punctuation runs together, so ``</code><sandbox_output>`` yields a ``><``
token); such a token is TRAINED, because it completes the model's own ``</code>`` and masking it would leave the
model unable to close a code block. It can carry at most one character of a tag, never a sandbox image or result.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from thyme.errors import ProtocolError
from thyme.protocol import SANDBOX_OUTPUT_CLOSE, SANDBOX_OUTPUT_OPEN

# The label value PyTorch's cross-entropy (and every transformers model) ignores.
IGNORE_INDEX = -100

# A half-open character range [start, end).
Span = tuple[int, int]


def find_sandbox_spans(text: str, start: int = 0, end: int | None = None) -> list[Span]:
    """Finds every ``<sandbox_output>...</sandbox_output>`` block, tags included, in ``text[start:end]``.

    Everything inside a block came from the sandbox (image blocks, a text result or an error), so a block ends at the
    FIRST closing tag after its opening tag.

    Args:
        text (`str`): the rendered conversation or assistant text.
        start (`int`, defaults to 0): where to start looking (e.g. the start of the assistant response).
        end (`int`, *optional*): where to stop looking; defaults to the end of ``text``.

    Returns:
        `list[Span]`: the blocks' character ranges, in order.

    Raises:
        ProtocolError: a block opens and never closes, or a closing tag has no opening tag.

    Example:
        >>> find_sandbox_spans("a<sandbox_output>x</sandbox_output>b")
        [(1, 35)]
    """
    end = len(text) if end is None else end
    spans: list[Span] = []
    position = start
    while True:
        opening = text.find(SANDBOX_OUTPUT_OPEN, position, end)
        closing = text.find(SANDBOX_OUTPUT_CLOSE, position, end)
        if closing >= 0 and (opening < 0 or closing < opening):
            raise ProtocolError(
                f"{SANDBOX_OUTPUT_CLOSE} at character {closing} has no {SANDBOX_OUTPUT_OPEN} before it: "
                "the response is not in the Thyme format"
            )
        if opening < 0:
            return spans
        if closing < 0:
            raise ProtocolError(
                f"{SANDBOX_OUTPUT_OPEN} at character {opening} never closes: every sandbox output block must end "
                f"with {SANDBOX_OUTPUT_CLOSE}"
            )
        block_end = closing + len(SANDBOX_OUTPUT_CLOSE)
        spans.append((opening, block_end))
        position = block_end


def trained_char_spans(
    text: str,
    response: Span,
    *,
    mask_sandbox_output: bool = True,
    last_round_only: bool = True,
) -> list[Span]:
    """The character ranges of ``text`` that carry loss: the response, minus what the model did not write.

    Args:
        text (`str`): the rendered conversation (chat template applied, images not expanded).
        response (`Span`): where the assistant response lies in ``text`` (include the end-of-turn token, so the model
            learns to stop); everything outside it, the prompt included, is masked.
        mask_sandbox_output (`bool`, defaults to `True`): mask every sandbox output block. ``False`` is the paper's
            "naive SFT" ablation, which trains on the sandbox's text and image tokens (not recommended).
        last_round_only (`bool`, defaults to `True`): with two or more sandbox blocks, also mask everything up to and
            including the second-to-last block's closing tag (the original SFT rule, reference 3.3).

    Returns:
        `list[Span]`: disjoint, ordered ranges to train on.

    Raises:
        ProtocolError: unbalanced sandbox tags in the response.

    Example:
        >>> text = "Q:A1<sandbox_output>r1</sandbox_output>A2<sandbox_output>r2</sandbox_output>A3"
        >>> [text[s:e] for s, e in trained_char_spans(text, (2, len(text)))]
        ['A2', 'A3']
    """
    start, end = response
    blocks = find_sandbox_spans(text, start, end)
    if last_round_only and len(blocks) >= 2:
        start = blocks[-2][1]
        blocks = blocks[-1:]
    if not mask_sandbox_output:
        return [(start, end)] if end > start else []
    spans: list[Span] = []
    cursor = start
    for block_start, block_end in blocks:
        if block_start > cursor:
            spans.append((cursor, block_start))
        cursor = block_end
    if end > cursor:
        spans.append((cursor, end))
    return spans


def expand_spans(spans: Sequence[Span], replacements: Sequence[Mapping[str, Any]]) -> list[Span]:
    """Moves character spans of the unexpanded text to the processor's expanded text.

    The Qwen-VL processors replace each ``<|image_pad|>`` with one copy per visual token before tokenizing and, with
    ``return_text_replacement_offsets=True``, report each replacement's original ``span`` and its ``new_span``.
    Span boundaries never fall inside a placeholder (they sit at tag or turn boundaries), so a position moves by
    the growth of every replacement that ends at or before it.

    Args:
        spans (`Sequence[Span]`): ranges in the text given to the processor.
        replacements (`Sequence[Mapping]`): one sample's ``text_replacement_offsets`` entries, in text order.

    Returns:
        `list[Span]`: the same ranges in the expanded text.
    """

    def move(position: int) -> int:
        shift = 0
        for replacement in replacements:
            old_start, old_end = replacement["span"]
            if old_end > position:
                break
            new_start, new_end = replacement["new_span"]
            shift += (new_end - new_start) - (old_end - old_start)
        return position + shift

    return [(move(start), move(end)) for start, end in spans]


def token_mask_from_spans(offsets: Sequence[Sequence[int]], spans: Sequence[Span]) -> list[bool]:
    """Marks the tokens whose character range overlaps a trained span.

    Args:
        offsets (`Sequence[Sequence[int]]`): the tokenizer's ``offset_mapping`` of one sequence, ``(start, end)`` per
            token in the tokenized (expanded) text; padding tokens have an empty range and are never trained.
        spans (`Sequence[Span]`): ordered, disjoint trained ranges in the same text.

    Returns:
        `list[bool]`: one flag per token, True where the token carries loss.

    Example:
        >>> token_mask_from_spans([(0, 2), (2, 4), (4, 6), (0, 0)], [(3, 5)])
        [False, True, True, False]
    """
    mask: list[bool] = []
    index = 0
    for token_start, token_end in offsets:
        token_start, token_end = int(token_start), int(token_end)
        if token_end <= token_start:
            mask.append(False)
            continue
        # Tokens come in text order, so the span pointer only moves forward.
        while index < len(spans) and spans[index][1] <= token_start:
            index += 1
        mask.append(index < len(spans) and spans[index][0] < token_end)
    return mask


__all__ = [
    "IGNORE_INDEX",
    "Span",
    "expand_spans",
    "find_sandbox_spans",
    "token_mask_from_spans",
    "trained_char_spans",
]
