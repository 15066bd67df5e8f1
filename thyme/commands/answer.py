"""``thyme answer IMAGE QUESTION``: ask one question, watch the reasoning stream, get the answer last."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any, TextIO

from thyme.commands.options import (
    add_loop_arguments,
    add_model_arguments,
    agent_config_from_args,
    check_model_name,
    load_model_backend,
)


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Adds the ``answer`` sub-command."""
    parser = commands.add_parser(
        "answer",
        help="answer a question about an image (reasoning streams, answer last)",
        description=(
            "Runs the Thyme agent on one image: the model reasons, writes Python that the sandbox runs, sees the "
            "crops it made, and answers. Choose the model with --model (a hub id or a local directory, loaded with "
            "transformers), --endpoint (an OpenAI-compatible server such as vLLM) or --scripted (replay recorded "
            "model text, no weights needed)."
        ),
    )
    parser.add_argument("image", type=Path, metavar="IMAGE", help="the image file")
    parser.add_argument("question", metavar="QUESTION", help="the question (quote it)")
    add_model_arguments(parser, required=True)
    parser.add_argument("--json", action="store_true", help="print one JSON object (answer + trajectory) only")
    parser.add_argument("--save-dir", type=Path, metavar="DIR", help="keep the sandbox images and trajectory.json")
    add_loop_arguments(parser, max_attempts=2, max_attempts_help="attempts before the fallback (2)")
    parser.set_defaults(handler=run_answer)


def _build_backend(args: argparse.Namespace) -> Any:
    from thyme.backends import BACKENDS

    check_model_name(args)
    if args.scripted:
        return BACKENDS["scripted"](args.scripted)
    if args.endpoint:
        return BACKENDS["openai"](args.endpoint, model=args.model_name)
    return load_model_backend(args)


def _describe_image(path: str, show_path: bool) -> str:
    from PIL import Image

    with Image.open(path) as image:
        size = f"{image.width}x{image.height}"
    return f"[sandbox image {size}: {path}]" if show_path else f"[sandbox image {size}]"


def _print_event(event: Any, out: TextIO, show_paths: bool) -> None:
    """Streams one loop event as plain text: the model's words as they come, sandbox results in brackets."""
    from thyme.loop import AttemptStarted, SandboxFinished, TextGenerated

    if isinstance(event, AttemptStarted) and (event.attempt > 1 or event.fallback):
        label = "fallback prompt" if event.fallback else f"attempt {event.attempt}"
        out.write(f"\n[no answer yet: {label}]\n")
    elif isinstance(event, TextGenerated):
        out.write(event.segment.text)
    elif isinstance(event, SandboxFinished):
        output = event.output
        hidden = " (hidden from the model)" if event.hidden else ""
        if output.images:
            out.write("".join("\n" + _describe_image(path, show_paths) for path in output.images) + "\n")
        elif output.error:
            out.write(f"\n[sandbox error{hidden}: {output.error}]\n")
        else:
            out.write(f"\n[sandbox output: {output.text}]\n")
    out.flush()


def _report(result: Any, args: argparse.Namespace) -> None:
    if args.save_dir:
        result.trajectory.save(args.save_dir / "trajectory.json")
    if args.json:
        summary = {
            "answer": result.answer,
            "has_answer": result.has_answer,
            "stop_reason": result.stop_reason,
            "used_fallback": result.used_fallback,
            "generation_calls": result.generation_calls,
            "code_runs": result.code_runs,
            "code_errors": result.code_errors,
            "trajectory": result.trajectory.to_dict(),
        }
        print(json.dumps(summary, ensure_ascii=False))
        return
    print(f"\n\nAnswer: {result.answer}")
    if args.save_dir:
        images = len(result.trajectory.sandbox_images)
        print(f"saved: {args.save_dir / 'trajectory.json'} and {images} sandbox image(s) in {args.save_dir}")


def run_answer(args: argparse.Namespace) -> int:
    """Builds the agent from the flags, streams the run, prints the answer (or JSON), saves if asked.

    Returns 0 also when the model gave no answer: that is a defined outcome (``has_answer`` false, the original's
    "No answer tag found" text as the answer), not a failure of the command.
    """
    from thyme.agent import ThymeAgent
    from thyme.loop import Finished

    with tempfile.TemporaryDirectory(prefix="thyme-answer-") as scratch:
        config = agent_config_from_args(args, images_dir=args.save_dir or Path(scratch))
        with ThymeAgent(_build_backend(args), config=config) as agent:
            for event in agent.stream(args.image, args.question):
                if not args.json:
                    _print_event(event, sys.stdout, show_paths=args.save_dir is not None)
                if isinstance(event, Finished):
                    _report(event.result, args)
    return 0
