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
    parser.add_argument(
        "output_dir", type=Path, metavar="DIR", help="directory to write (new, empty, or holding this same tiny model)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: 0)")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty DIR, replacing its files")
    parser.add_argument(
        "--model-type", choices=("qwen2_5_vl", "qwen3_vl"), default="qwen2_5_vl", help="architecture (qwen2_5_vl)"
    )
    parser.add_argument(
        "--head-dim",
        type=int,
        choices=(16, 64),
        default=16,
        help="attention head size (16); 64 builds the variant vLLM's CPU attention accepts (text hidden 128)",
    )
    parser.set_defaults(handler=run_tiny_model)


def run_tiny_model(args: argparse.Namespace) -> int:
    """Builds the checkpoint and prints where it is and how to use it."""
    from thyme.tiny import build_tiny_model, is_same_tiny_model

    engine = " --engine vllm" if args.head_dim == 64 else ""
    kept = not args.overwrite and is_same_tiny_model(
        args.output_dir, seed=args.seed, model_type=args.model_type, head_dim=args.head_dim
    )
    path = build_tiny_model(
        args.output_dir, seed=args.seed, overwrite=args.overwrite, model_type=args.model_type, head_dim=args.head_dim
    )
    if kept:
        print(f"{path} already holds the tiny {args.model_type} model (seed {args.seed}, head_dim {args.head_dim}): "
              "kept")
    else:
        print(f"tiny {args.model_type} model written to {path} (head_dim {args.head_dim})")
    print(
        f"try: thyme answer thyme/data/examples/17127.jpg 'What is the plate number?' --model {path}{engine} "
        "--max-new-tokens 32   (its answers are noise; the run shows the loop's calls, tokens and stop reason)"
    )
    return 0
