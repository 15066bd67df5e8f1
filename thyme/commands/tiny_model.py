"""``thyme tiny-model DIR``: writes the tiny random-weight Qwen2.5-VL used by tests and for dry runs."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Adds the ``tiny-model`` sub-command."""
    parser = commands.add_parser(
        "tiny-model",
        help="build a tiny random-weight Qwen2.5-VL checkpoint (offline) for dry runs",
        description=(
            "Writes a ~0.2M-parameter random Qwen2.5-VL (real tokenizer format, chat template and image processor) "
            "to DIR. Its answers are noise; it exercises every loading, image and generation path without weights."
        ),
    )
    parser.add_argument("output_dir", type=Path, metavar="DIR", help="directory to write (must be empty or new)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: 0)")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty DIR, replacing its files")
    parser.add_argument(
        "--model-type", choices=("qwen2_5_vl", "qwen3_vl"), default="qwen2_5_vl", help="architecture (qwen2_5_vl)"
    )
    parser.set_defaults(handler=run_tiny_model)


def run_tiny_model(args: argparse.Namespace) -> int:
    """Builds the checkpoint and prints where it is and how to use it."""
    from thyme.tiny import build_tiny_model

    path = build_tiny_model(args.output_dir, seed=args.seed, overwrite=args.overwrite, model_type=args.model_type)
    print(f"tiny {args.model_type} model written to {path}")
    print(f"try: thyme answer IMAGE QUESTION --model {path}")
    return 0
