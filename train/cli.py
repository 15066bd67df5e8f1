"""``thyme-train CONFIG.yaml [--override key=value ...]``: GRPO-ATS training; ``thyme-train sft ...``: SFT.

One YAML file holds every key of :class:`~thyme.train.config.ThymeGRPOConfig` (TRL's GRPOConfig + Thyme's rollout,
sandbox and reward fields), TRL's ``ModelConfig`` (``model_name_or_path``, ``dtype``, ``use_peft``, ``lora_r``, ...)
and :class:`RLDataArguments`. ``--override key=value`` changes one key (the value is read as YAML, so
``--override max_steps=3`` is an int). Examples: ``train/examples/tiny_cpu.yaml`` (seconds on a CPU with
``thyme tiny-model``) and ``train/examples/thyme_rl_gpu.yaml`` (the original's GPU settings).

``resume_from_checkpoint``: a checkpoint folder, or ``true`` for the newest ``checkpoint-*`` in ``output_dir``.
Multi-process: ``accelerate launch [--config_file train/examples/accelerate_*.yaml] -m thyme.train.cli CONFIG.yaml``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from thyme.errors import ConfigError, ThymeError

logger = logging.getLogger(__name__)

SFT_COMMAND = "sft"
# resume_from_checkpoint values that mean "the newest checkpoint in output_dir" (RL and SFT alike).
RESUME_LATEST = ("true", "last", "latest")


@dataclass
class RLDataArguments:
    """Where the RL data and (for dry runs) the scripted rollout text come from."""

    train_file: str | None = field(
        default=None,
        metadata={"help": "Thyme-RL JSON/JSONL rows, a folder of them, or a `datasets` name (see docs/train.md)."},
    )
    train_split: str = field(default="train", metadata={"help": "Split of a `datasets` name."})
    image_root: str | None = field(
        default=None, metadata={"help": "Folder relative image paths are resolved against (default: the data's)."}
    )
    rollout_script: str | None = field(
        default=None,
        metadata={
            "help": "JSON script of model text every rollout replays while the policy scores it (dry runs and "
            "tests; a random tiny model never writes code). None = the policy generates."
        },
    )


def read_config_values(path: Path, overrides: Sequence[str]) -> dict[str, Any]:
    """Reads a YAML mapping and applies ``key=value`` overrides (values parsed as YAML).

    Raises:
        ConfigError: the file is unreadable or not a mapping, or an override is not ``key=value``.
    """
    import yaml

    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from exc
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values, got {type(values).__name__}")
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--override {override!r}: expected KEY=VALUE, e.g. --override learning_rate=1e-6")
        values[key.strip()] = yaml.safe_load(raw)
    return values


_KIND_WORDS = {bool: "true or false", int: "an integer", float: "a number"}


def check_value_types(values: dict[str, Any], dataclass_types: Sequence[type], source: Path) -> None:
    """Refuses a value of the wrong type for a boolean or numeric key (``--override max_steps=abc``) with one line,
    before TRL meets it as a raw ``TypeError`` deep in training. Keys that also take text or structures pass.

    Raises:
        ConfigError: names the key, the value and the type it needs.
    """
    hints: dict[str, Any] = {}
    for cls in dataclass_types:
        hints.update(typing.get_type_hints(cls))
    for key, value in values.items():
        kinds = set(typing.get_args(hints.get(key))) or {hints.get(key)}
        kinds.discard(type(None))
        if value is None or not kinds or not kinds <= set(_KIND_WORDS):
            continue
        is_bool = isinstance(value, bool)
        if (bool in kinds and is_bool) or (not is_bool and isinstance(value, tuple(kinds - {bool}))):
            continue
        if float in kinds and isinstance(value, int) and not is_bool:
            continue
        expected = " or ".join(word for kind, word in _KIND_WORDS.items() if kind in kinds)
        raise ConfigError(f"{source}: {key}={value!r} is not {expected} (e.g. --override {key}=...)")


def make_parser() -> argparse.ArgumentParser:
    """The ``thyme-train`` argument parser (the YAML keys are documented in docs/train.md)."""
    parser = argparse.ArgumentParser(
        prog="thyme-train",
        description="GRPO-ATS training of a Thyme model (`thyme-train sft CONFIG.yaml` for supervised fine-tuning).",
    )
    parser.add_argument("config", type=Path, help="YAML file with ThymeGRPOConfig, ModelConfig and data keys")
    parser.add_argument(
        "--override", action="append", default=[], metavar="KEY=VALUE", help="change one key (value read as YAML)"
    )
    return parser


def parse_config(argv: Sequence[str] | None) -> tuple[RLDataArguments, Any, Any]:
    """Parses ``CONFIG.yaml [--override ...]`` into (RLDataArguments, ThymeGRPOConfig, ModelConfig).

    Raises:
        ConfigError: unknown keys (all named), a missing model or data file, or an invalid value.
    """
    from transformers import HfArgumentParser
    from trl import ModelConfig

    from thyme.train.config import ThymeGRPOConfig
    from thyme.train.sft import coerce_numbers

    args = make_parser().parse_args(argv)
    types = (RLDataArguments, ThymeGRPOConfig, ModelConfig)
    values = coerce_numbers(read_config_values(args.config, args.override), types)
    parser = HfArgumentParser(types)
    known = {name for cls in parser.dataclass_types for name in cls.__dataclass_fields__}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{args.config}: unknown key(s) {unknown}; the keys are listed in docs/train.md")
    check_value_types(values, types, args.config)
    try:
        data_args, config, model_config = parser.parse_dict(values)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ThymeError):
            raise
        raise ConfigError(f"{args.config}: {exc}") from exc
    if not model_config.model_name_or_path:
        raise ConfigError(f"{args.config}: set model_name_or_path (a hub id or a local checkpoint folder)")
    if not data_args.train_file:
        raise ConfigError(f"{args.config}: set train_file (Thyme-RL rows or {{image, question, answer}} JSONL)")
    return data_args, config, model_config


def resolve_resume(config: Any) -> str | None:
    """``resume_from_checkpoint`` of an RL or SFT config: a checkpoint folder, or ``true``/``last``/``latest`` for the
    newest ``checkpoint-*`` in ``output_dir``; ``None`` (or ``false``) starts fresh.

    Raises:
        ConfigError: the newest checkpoint was asked but ``output_dir`` holds none, or the folder does not exist.
    """
    value = config.resume_from_checkpoint
    if value is None or str(value).lower() in ("false", "none", ""):
        return None
    if str(value).lower() in RESUME_LATEST:
        from transformers.trainer_utils import get_last_checkpoint

        last = get_last_checkpoint(config.output_dir) if Path(config.output_dir).is_dir() else None
        if last is None:
            raise ConfigError(f"resume_from_checkpoint={value}: no checkpoint-* folder in {config.output_dir}")
        return last
    if not Path(value).is_dir():
        raise ConfigError(f"resume_from_checkpoint {value} is not a folder")
    return str(value)


def train(data_args: RLDataArguments, config: Any, model_config: Any) -> Path:
    """Loads data and model, trains, saves the final model and processor to ``output_dir``; returns it."""
    from trl import get_peft_config

    from thyme.train.data import load_rl_dataset
    from thyme.train.trainer import ThymeGRPOTrainer

    dataset = load_rl_dataset(data_args.train_file, split=data_args.train_split, image_root=data_args.image_root)
    resume = resolve_resume(config)
    if config.model_init_kwargs is None:
        config.model_init_kwargs = {"dtype": model_config.dtype or "auto"}
        if model_config.attn_implementation:
            config.model_init_kwargs["attn_implementation"] = model_config.attn_implementation
    trainer = ThymeGRPOTrainer(
        model_config.model_name_or_path,
        args=config,
        train_dataset=dataset,
        peft_config=get_peft_config(model_config),
        rollout_script=data_args.rollout_script,
    )
    try:
        trainer.train(resume_from_checkpoint=resume)
        trainer.save_model(config.output_dir)
        trainer.processing_class.save_pretrained(config.output_dir)
    finally:
        trainer.close()
    return Path(config.output_dir)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``thyme-train``; returns the exit code (1 with one line on stderr for a Thyme error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == SFT_COMMAND:
        from thyme.train.sft import main as sft_main

        return sft_main(argv[1:])
    from thyme.sandbox.errors import SandboxError

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        output = train(*parse_config(argv))
    except (ThymeError, SandboxError) as exc:
        print(f"thyme-train: error: {exc}", file=sys.stderr)
        return 1
    print(f"saved to {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
