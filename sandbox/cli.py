"""``thyme sandbox ...``: run a code file in the sandbox from the command line.

Only the standard library is imported at load time; the sandbox itself is imported inside the handler.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Adds the ``sandbox`` group to the ``thyme`` command."""
    group = commands.add_parser("sandbox", help="run model-written code in the sandbox (and serve it)",
                                description="Run model-written Python safely, as the Thyme weights expect.")
    add_sandbox_commands(group.add_subparsers(dest="sandbox_command", metavar="SUBCOMMAND", required=True))
    return group


def add_sandbox_commands(subcommands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Adds the sub-commands of ``thyme sandbox``; other modules add theirs to the same ``subcommands``."""
    run = subcommands.add_parser("run", help="run one code file against an image and print the result",
                                 description="Run CODE.py in a fresh sandbox session over the input image(s).")
    run.add_argument("code_path", metavar="CODE.py", type=Path, help="the Python code to run ('-' reads stdin)")
    run.add_argument("--image", action="append", required=True, metavar="IN.jpg",
                     help="input image (repeat for several); the code sees it as `image_path`")
    run.add_argument("--item-id", default=None, help="id used in error lines (default: the image's file name)")
    run.add_argument("--timeout-s", type=float, default=None, help="wall-clock seconds for the code (default 10)")
    run.add_argument("--output-dir", type=Path, default=None,
                     help="copy the images the code saved into this directory, printed or not (deleted otherwise)")
    run.add_argument("--json", action="store_true", help="print the result as one JSON object")
    run.set_defaults(handler=run_code)

    from thyme.sandbox.server.cli import add_server_commands  # `serve` and `mcp`; imports only the stdlib

    add_server_commands(subcommands)


def run_code(args: argparse.Namespace) -> int:
    """Handler of ``thyme sandbox run``: exit code 0 when the code ran fine, 2 when it failed."""
    from thyme.sandbox import Sandbox
    from thyme.sandbox.errors import InvalidInput

    if str(args.code_path) == "-":
        code = sys.stdin.read()
    else:
        try:
            code = args.code_path.read_text(encoding="utf-8")
        except OSError as exc:
            raise InvalidInput(f"cannot read the code file {str(args.code_path)!r}: {exc.strerror}") from exc
    with Sandbox(timeout=args.timeout_s, pool_size=0) as sandbox:
        with sandbox.session(images=args.image, item_id=args.item_id) as session:
            result = session.run(code)
            unprinted = unprinted_images(session.scratch_dir, result.images)
            images = result.images
            if args.output_dir is not None:
                args.output_dir.mkdir(parents=True, exist_ok=True)
                images = _copy_into(result.images, args.output_dir)
                unprinted = _copy_into(unprinted, args.output_dir)
    if args.json:
        print(json.dumps(dict(result.to_dict(), images=images, unprinted_images=unprinted)))
    else:
        if result.stdout:
            print(result.stdout, end="" if result.stdout.endswith("\n") else "\n")
        for path in images:
            print(f"image: {path}")
        if result.error:
            print(result.error, file=sys.stderr)
        if unprinted:
            print(_unprinted_note(unprinted, kept=args.output_dir is not None), file=sys.stderr)
    return 0 if result.ok else 2


def unprinted_images(scratch_dir: Path, printed: list[str]) -> list[str]:
    """Images the code saved in its scratch directory without printing their path.

    A model sees a saved image only when its code prints the path (the protocol the weights were trained with), so
    a CLI user trying code out must hear about the others, or a crop seems to vanish.
    """
    from thyme.sandbox.returned import IMAGE_EXTENSIONS

    # The returned images are the parent's copies (outside the scratch dir), so a saved file is matched by content.
    shown = {_digest(Path(path)) for path in printed}
    saved = [path for path in Path(scratch_dir).rglob("*") if path.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS]
    return sorted(str(path) for path in saved
                  if path.is_file() and not path.is_symlink() and _digest(path) not in shown)


def _digest(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _copy_into(paths: list[str], folder: Path) -> list[str]:
    import shutil

    return [str(Path(shutil.copy2(path, folder / Path(path).name)).resolve()) for path in paths]


def _unprinted_note(paths: list[str], *, kept: bool) -> str:
    names = ", ".join(Path(path).name for path in paths)
    where = "kept in --output-dir" if kept else "deleted now; pass --output-dir DIR to keep them"
    return (
        f"note: the code saved {len(paths)} image(s) without printing the path ({names}): {where}. A model sees "
        "only the images whose path its code prints, e.g. print(processed_path)."
    )
