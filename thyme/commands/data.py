"""``thyme data convert``: released Thyme-SFT files -> local JSONL rows + image files, paths rewritten (issue #7)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Adds the ``data`` command group."""
    parser = commands.add_parser("data", help="prepare training data (convert the released Thyme-SFT files)")
    actions = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    convert = actions.add_parser(
        "convert",
        help="released Thyme-SFT parquet/JSONL -> local JSONL with image files and rewritten paths",
        description=(
            "Decodes the base64 images of released Thyme-SFT rows (HF Kwai-Keye/Thyme-SFT parquet, or JSONL/JSON with "
            "base64 or local image paths) into files beside OUTPUT, and rewrites the authors' image path "
            "(/mllm_hdd/...) in the question's 'User Image Path' line and wherever the response repeats it (prose "
            "and code) to the local file. The result is what `thyme-train sft` reads (train_file: OUTPUT)."
        ),
    )
    convert.add_argument("inputs", nargs="+", type=Path, metavar="INPUT", help=".parquet, .jsonl or .json files")
    convert.add_argument(
        "-o",
        "--output",
        type=Path,
        required=True,
        metavar="OUTPUT",
        help="JSONL to write (out.jsonl puts its images in out_images/)",
    )
    convert.add_argument("--limit", type=int, metavar="N", help="stop after N rows (a quick look at the data)")
    convert.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    convert.set_defaults(handler=run_convert)


def run_convert(args: argparse.Namespace) -> int:
    """Converts the files; prints one summary line, plus one line per skipped row on stderr."""
    from thyme.errors import ConfigError
    from thyme.train.sft_data import convert_files

    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit ({args.limit}) must be >= 1")
    report = convert_files(args.inputs, args.output, limit=args.limit, overwrite=args.overwrite)
    for line in report.skipped:
        print(f"skipped {line}", file=sys.stderr)
    print(f"wrote {report.rows} rows ({report.images} images) to {report.output}; skipped {len(report.skipped)}")
    return 0 if report.rows else 1
