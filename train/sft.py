"""``thyme-train sft``: the supervised stage that teaches a Qwen2.5-VL base model to write Thyme code (Thyme-SFT).

Built on TRL's ``SFTTrainer``; Thyme adds only what TRL cannot know:

- the data form (``image`` / ``question`` / ``response`` rows, see :mod:`thyme.train.sft_data`) rendered with the
  official system prompt into one assistant message that holds the sandbox images;
- the loss mask of :mod:`thyme.train.masking`: sandbox output never trained, and by default only the last code round
  and the answer (the recipe of the paper's Table 5; TRL's ``assistant_only_loss`` would train the sandbox spans);
- the original's defaults (thyme-reference.md section 3.6): lr 1e-5 (stage 2: 1e-6), 3 epochs, warmup 0.05,
  ``max_length`` 10240, vision tower frozen, ``max_pixels`` 3211264. ``train/examples/sft_thyme.yaml`` spells out the
  GPU run (global batch 128).

The config is one YAML file whose keys are the fields of :class:`ThymeSFTConfig` (TRL's ``SFTConfig`` and
``TrainingArguments`` included) and of TRL's ``ModelConfig`` (model path, dtype, ``use_peft`` / ``lora_*``), the same
style as the RL trainer; ``--override key=value`` changes one key (values are read as YAML).
"""

from __future__ import annotations

import argparse
import logging
import sys
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trl import ModelConfig, SFTConfig, SFTTrainer

from thyme.errors import ConfigError, ThymeError
from thyme.train.checkpoint import QwenVLResumeMixin

if TYPE_CHECKING:
    from datasets import Dataset
    from peft import PeftConfig
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)

ORIGINAL_SFT_MAX_PIXELS = 3211264
DEFAULT_MIN_PIXELS = 3136
# The vision tower's module name in transformers' Qwen2-VL/2.5-VL/3-VL models; LoRA leaves it alone when it is frozen.
VISION_MODULE_REGEX = r".*\.visual\..*"


@dataclass
class ThymeSFTConfig(SFTConfig):
    """``SFTConfig`` with Thyme's data, masking and image settings; defaults are the original's SFT stage 1.

    Example:
        >>> cfg = ThymeSFTConfig(output_dir="/tmp/sft", train_file="data.jsonl", use_cpu=True, report_to="none")
        >>> (cfg.learning_rate, cfg.num_train_epochs, cfg.max_length, cfg.last_round_only)
        (1e-05, 3.0, 10240, True)
    """

    # Overridden TRL/transformers defaults (original SFT stage 1).
    learning_rate: float = field(
        default=1e-5, metadata={"help": "AdamW learning rate (stage 1: 1e-5, stage 2: 1e-6)."}
    )
    num_train_epochs: float = field(default=3.0, metadata={"help": "Epochs (original: 3)."})
    warmup_ratio: float = field(default=0.05, metadata={"help": "Warm-up share of the steps (original: 0.05)."})
    max_length: int | None = field(
        default=10240,
        metadata={
            "help": "Longest sequence in tokens (image tokens included); longer rows are dropped, as swift did."
        },
    )
    remove_unused_columns: bool = field(
        default=False,
        metadata={"help": "Must stay False: the collator reads the image/question/response columns itself."},
    )

    # Data.
    train_file: str = field(
        default="",
        metadata={
            "help": "Thyme-SFT rows (image/question/response): a .jsonl/.json file, a folder of them or a "
            "datasets name. Convert released data first with `thyme data convert`."
        },
    )
    train_split: str = field(default="train", metadata={"help": "Split to read when train_file is a datasets name."})
    image_root: str | None = field(
        default=None, metadata={"help": "Folder relative image paths are resolved against (default: the file's)."}
    )
    use_system_prompt: bool = field(
        default=True,
        metadata={
            "help": "Official Thyme system prompt (stage 1 passed --system); False = Qwen's default, as stage 2."
        },
    )

    # Loss mask (thyme-reference.md 3.3 and Table 5).
    mask_sandbox_output: bool = field(
        default=True,
        metadata={"help": "Mask every <sandbox_output> block (tags, images, text). False = the paper's naive SFT."},
    )
    last_round_only: bool = field(
        default=True,
        metadata={
            "help": "Also mask everything up to the second-to-last </sandbox_output>: train the last round only."
        },
    )

    # Model.
    freeze_vision_tower: bool = field(
        default=True, metadata={"help": "Keep the vision tower (ViT and merger) frozen (original: freeze_vit true)."}
    )
    min_pixels: int = field(default=DEFAULT_MIN_PIXELS, metadata={"help": "Smallest image area the model sees."})
    max_pixels: int = field(
        default=ORIGINAL_SFT_MAX_PIXELS,
        metadata={"help": "Largest image area the model sees (original SFT: 3211264)."},
    )

    def __post_init__(self) -> None:
        if self.min_pixels < 1 or self.max_pixels < self.min_pixels:
            raise ConfigError(
                f"max_pixels ({self.max_pixels}) < min_pixels ({self.min_pixels}): "
                "raise max_pixels or lower min_pixels"
            )
        if self.remove_unused_columns:
            raise ConfigError(
                "remove_unused_columns must be false for thyme-train sft: the collator needs the image, question and "
                "response columns, which are not model inputs"
            )
        if self.packing or self.padding_free:
            raise ConfigError("packing and padding_free are not supported with images: set both to false")
        super().__post_init__()


def parse_config(argv: Sequence[str] | None) -> tuple[ThymeSFTConfig, ModelConfig]:
    """Reads ``CONFIG.yaml [--override key=value ...]`` into the SFT and model configs (the RL trainer's YAML reader,
    so both stages take the same file style).

    Raises:
        ConfigError: the file is unreadable, a key is unknown (all named), an override is not ``key=value``, a value
            is invalid, or the model or data is not set.
    """
    from transformers import HfArgumentParser

    from thyme.train.cli import check_value_types, read_config_values

    parser = argparse.ArgumentParser(prog="thyme-train sft", description="Supervised fine-tuning of a Thyme model.")
    parser.add_argument("config", type=Path, help="YAML file with ThymeSFTConfig and ModelConfig keys (docs/sft.md)")
    parser.add_argument(
        "--override", action="append", default=[], metavar="KEY=VALUE", help="change one key (value read as YAML)"
    )
    args = parser.parse_args(argv)
    values = coerce_numbers(read_config_values(args.config, args.override), (ThymeSFTConfig, ModelConfig))
    hf_parser = HfArgumentParser((ThymeSFTConfig, ModelConfig))
    known = {name for cls in hf_parser.dataclass_types for name in cls.__dataclass_fields__}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{args.config}: unknown key(s) {unknown}; the keys are listed in docs/sft.md")
    check_value_types(values, (ThymeSFTConfig, ModelConfig), args.config)
    try:
        sft_config, model_config = hf_parser.parse_dict(values)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ThymeError):
            raise
        raise ConfigError(f"{args.config}: {exc}") from exc
    if not model_config.model_name_or_path:
        raise ConfigError(f"{args.config}: set model_name_or_path (a hub id or a local checkpoint folder)")
    if not sft_config.train_file:
        raise ConfigError(
            f"{args.config}: set train_file (Thyme-SFT rows; convert released data with `thyme data convert`)"
        )
    return sft_config, model_config


def coerce_numbers(values: dict[str, Any], dataclass_types: Sequence[type]) -> dict[str, Any]:
    """Turns numeric text into numbers for numeric fields: PyYAML follows YAML 1.1, which reads ``1e-6`` (no dot) as a
    string, and ``HfArgumentParser.parse_dict`` does not convert types, so ``learning_rate: 1e-6`` would reach the
    optimizer as text.

    Returns:
        `dict`: a new mapping; fields that accept strings keep their text.
    """
    hints: dict[str, Any] = {}
    for cls in dataclass_types:
        hints.update(typing.get_type_hints(cls))
    coerced = dict(values)
    for key, value in values.items():
        kinds = set(typing.get_args(hints.get(key))) or {hints.get(key)}
        if not isinstance(value, str) or str in kinds:
            continue
        for kind in (int, float):
            if kind in kinds:
                try:
                    coerced[key] = kind(value)
                    break
                except ValueError:
                    continue
    return coerced


def load_sft_dataset(config: ThymeSFTConfig) -> Dataset:
    """Reads the SFT rows, resolves relative image paths and checks that every image exists.

    Returns:
        `datasets.Dataset`: columns ``image`` (list of absolute paths), ``question``, ``response``.

    Raises:
        ConfigError: the data is empty, a row lacks a column, or images are missing (all listed).
    """
    from datasets import Dataset

    from thyme.train.data import check_images, read_located_rows
    from thyme.train.sft_data import SFT_COLUMNS

    located, folder = read_located_rows(config.train_file, config.train_split)
    if not located:
        raise ConfigError(f"{config.train_file}: the dataset is empty")
    root = Path(config.image_root) if config.image_root is not None else folder
    rows = []
    for where, row in located:
        missing = [column for column in SFT_COLUMNS if column not in row]
        if missing:
            raise ConfigError(
                f"{where}: no {missing}; SFT rows need {list(SFT_COLUMNS)} (`thyme data convert` makes them)"
            )
        images = [_absolute(str(path), root) for path in (row["image"] or [])]
        rows.append({"image": images, "question": str(row["question"]), "response": str(row["response"])})
    check_images([{"image": path} for row in rows for path in row["image"]])
    return Dataset.from_list(rows)


def _absolute(path: str, root: Path | None) -> str:
    candidate = Path(path).expanduser()
    if not candidate.is_absolute() and root is not None:
        candidate = root / candidate
    return str(candidate.absolute())


def load_model(config: ThymeSFTConfig, model_config: ModelConfig) -> PreTrainedModel:
    """Loads the model with ``from_pretrained`` and freezes the vision tower when asked.

    Raises:
        ModelNotFoundError: the checkpoint cannot be read.
    """
    import torch
    from transformers import AutoModelForImageTextToText

    from thyme.errors import ModelNotFoundError

    dtype = model_config.dtype if model_config.dtype in (None, "auto") else getattr(torch, model_config.dtype)
    try:
        model = AutoModelForImageTextToText.from_pretrained(
            model_config.model_name_or_path,
            revision=model_config.model_revision,
            dtype=dtype,
            attn_implementation=model_config.attn_implementation,
        )
    except OSError as exc:
        raise ModelNotFoundError(f"cannot load model {model_config.model_name_or_path!r}: {exc}") from exc
    if config.freeze_vision_tower:
        # transformers' Qwen-VL models keep the ViT and its merger under model.visual.
        model.get_submodule("model.visual").requires_grad_(False)
    return model


def peft_config_for(config: ThymeSFTConfig, model_config: ModelConfig) -> PeftConfig | None:
    """TRL's LoRA config from ``ModelConfig``, kept off the vision tower when that is frozen (Qwen's ViT MLP shares
    the ``gate_proj``/``up_proj``/``down_proj`` names with the language model)."""
    from trl import get_peft_config

    peft_config = get_peft_config(model_config)
    if peft_config is not None and config.freeze_vision_tower:
        peft_config.exclude_modules = VISION_MODULE_REGEX
    return peft_config


class ThymeSFTTrainer(QwenVLResumeMixin, SFTTrainer):
    """TRL's ``SFTTrainer`` with checkpoint resume fixed for Qwen-VL models (:mod:`thyme.train.checkpoint`, shared
    with the RL trainer); nothing else is overridden."""


def train(config: ThymeSFTConfig, model_config: ModelConfig) -> Path:
    """Runs SFT and saves the model (or LoRA adapter) and processor to ``output_dir``.

    Returns:
        `Path`: the output directory.
    """
    from thyme.backends.processor import load_processor
    from thyme.train.cli import resolve_resume
    from thyme.train.sft_collator import ThymeSFTCollator

    processor = load_processor(model_config.model_name_or_path, config.min_pixels, config.max_pixels)
    collator = ThymeSFTCollator(
        processor,
        use_system_prompt=config.use_system_prompt,
        mask_sandbox_output=config.mask_sandbox_output,
        last_round_only=config.last_round_only,
        max_length=config.max_length,
    )
    dataset = load_sft_dataset(config)
    if config.max_length is not None:
        dataset = collator.drop_overlong(dataset, num_proc=config.dataset_num_proc)
    resume = resolve_resume(config)
    trainer = ThymeSFTTrainer(
        model=load_model(config, model_config),
        args=config,
        data_collator=collator,
        train_dataset=dataset,
        processing_class=processor,
        peft_config=peft_config_for(config, model_config),
    )
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(config.output_dir)
    processor.save_pretrained(config.output_dir)
    return Path(config.output_dir)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``thyme-train sft CONFIG.yaml [--override key=value ...]``; returns the exit code."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        config, model_config = parse_config(argv)
        output = train(config, model_config)
    except ThymeError as exc:
        print(f"thyme-train sft: error: {exc}", file=sys.stderr)  # noqa: T201 (CLI output)
        return 1
    print(f"saved to {output}")  # noqa: T201 (CLI output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["ThymeSFTConfig", "ThymeSFTTrainer", "coerce_numbers", "load_sft_dataset", "main", "parse_config", "train"]
