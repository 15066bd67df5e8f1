"""Batches of Thyme-SFT rows for TRL's ``SFTTrainer``: processor inputs plus labels that follow the Thyme loss mask.

TRL's own vision collator can only train everything or every assistant token; Thyme needs the sandbox spans inside
the assistant message masked (and, by default, the earlier rounds), so this collator renders each row, runs the
processor once on the whole batch (the same call inference makes, so the model sees identical tokens) and sets
labels from :mod:`thyme.train.masking`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from thyme.errors import ConfigError, ProtocolError
from thyme.train.masking import IGNORE_INDEX, Span, expand_spans, token_mask_from_spans, trained_char_spans
from thyme.train.sft_data import row_to_trajectory

if TYPE_CHECKING:
    from datasets import Dataset

logger = logging.getLogger(__name__)


@dataclass
class ThymeSFTCollator:
    """Turns SFT rows into ``input_ids``, ``attention_mask``, ``pixel_values``, ``image_grid_thw`` and ``labels``.

    Args:
        processor: the Qwen-VL processor (:func:`thyme.backends.processor.load_processor`), pixel limits set.
        use_system_prompt (`bool`): official Thyme system prompt, else Qwen's default.
        mask_sandbox_output (`bool`): mask every ``<sandbox_output>`` block (False = naive SFT).
        last_round_only (`bool`): mask everything up to the second-to-last ``</sandbox_output>``.
        max_length (`int`, *optional*): refuse batches with a longer sequence (drop such rows beforehand with
            :meth:`drop_overlong`; cutting a sequence could cut an image's tokens apart from its pixels).
    """

    processor: Any
    use_system_prompt: bool = True
    mask_sandbox_output: bool = True
    last_round_only: bool = True
    max_length: int | None = None

    def render(self, row: dict[str, Any]) -> tuple[str, list[Span], list[str]]:
        """Renders one row with the chat template.

        Returns:
            `tuple[str, list[Span], list[str]]`: the conversation text (images not yet expanded), its trained
            character spans, and the image paths in text order.

        Raises:
            ProtocolError: the row is not in the Thyme-SFT form.
        """
        trajectory = row_to_trajectory(row, use_system_prompt=self.use_system_prompt)
        messages = trajectory.to_messages()
        if len(messages) != 3:
            raise ProtocolError("SFT row has an empty response: there is nothing to train on")
        text = self.processor.apply_chat_template(messages, tokenize=False)
        prompt = self.processor.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
        if not text.startswith(prompt):
            raise ProtocolError("the chat template renders the prompt differently with and without the response")
        # The response runs to the end-of-turn token (trained, so the model learns to stop); the template's newline
        # after it is not part of the turn.
        response = (len(prompt), len(text.rstrip("\n")))
        spans = trained_char_spans(
            text, response, mask_sandbox_output=self.mask_sandbox_output, last_round_only=self.last_round_only
        )
        images = trajectory.image_paths + trajectory.sandbox_images
        return text, spans, images

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Collates rows: one processor call over the batch (right padding), then labels from the trained spans.

        Raises:
            ProtocolError: a row is not in the Thyme-SFT form.
            ConfigError: a sequence is longer than ``max_length``.
        """
        texts, spans, images = [], [], []
        for row in rows:
            text, row_spans, row_images = self.render(row)
            texts.append(text)
            spans.append(row_spans)
            images.extend(_open_rgb(path) for path in row_images)
        batch = self.processor(
            text=texts,
            images=images or None,
            padding=True,
            padding_side="right",
            return_offsets_mapping=True,
            return_text_replacement_offsets=True,
            return_tensors="pt",
        )
        offsets = batch.pop("offset_mapping").tolist()
        replacements = batch.pop("text_replacement_offsets")
        input_ids = batch["input_ids"]
        if self.max_length is not None and input_ids.shape[1] > self.max_length:
            raise ConfigError(
                f"a batch sequence has {input_ids.shape[1]} tokens > max_length ({self.max_length}); drop long rows "
                "with ThymeSFTCollator.drop_overlong, raise max_length or lower max_pixels"
            )
        labels = input_ids.new_full(input_ids.shape, IGNORE_INDEX)
        for index, row_spans in enumerate(spans):
            row_replacements = replacements[index] if replacements else []
            mask = token_mask_from_spans(offsets[index], expand_spans(row_spans, row_replacements))
            trained = torch.tensor(mask, dtype=torch.bool)
            labels[index, trained] = input_ids[index, trained]
        batch["labels"] = labels
        return batch

    def sequence_length(self, row: dict[str, Any]) -> int:
        """The row's token count, image tokens included, computed from image headers (no pixels decoded)."""
        text, _, images = self.render(row)
        image_processor = self.processor.image_processor
        merge = int(image_processor.merge_size) ** 2
        visual = 0
        for path in images:
            with Image.open(path) as image:
                width, height = image.size
            # Each image is one placeholder token in `text`, expanded to one token per merged patch.
            visual += image_processor.get_number_of_image_patches(height, width) // merge - 1
        return len(self.processor.tokenizer(text, add_special_tokens=False)["input_ids"]) + visual

    def drop_overlong(self, dataset: Dataset, num_proc: int | None = None) -> Dataset:
        """Drops rows longer than ``max_length`` (ms-swift's ``truncation_strategy='delete'``), logging how many.

        Args:
            dataset (`datasets.Dataset`): SFT rows.
            num_proc (`int`, *optional*): processes for the length check (a few hundred rows/s each).

        Returns:
            `datasets.Dataset`: the rows that fit.
        """
        if self.max_length is None:
            return dataset
        kept = dataset.filter(lambda row: self.sequence_length(row) <= self.max_length, num_proc=num_proc)
        dropped = len(dataset) - len(kept)
        if dropped:
            logger.warning("dropped %d of %d rows longer than max_length=%d", dropped, len(dataset), self.max_length)
        if not len(kept):
            raise ConfigError(f"every row is longer than max_length ({self.max_length}): raise it or lower max_pixels")
        return kept


def _open_rgb(path: str) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


__all__ = ["ThymeSFTCollator"]
