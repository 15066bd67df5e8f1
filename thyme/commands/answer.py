"""``thyme answer IMAGE [IMAGE ...] QUESTION`` (or ``-q QUESTION``): ask one question about one or several images,
watch the reasoning stream, get the answer last."""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, TextIO

from thyme.commands.options import (
    add_loop_arguments,
    add_model_arguments,
    agent_config_from_args,
    check_model_name,
    load_model_backend,
    with_model_pixel_limits,
)


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Adds the ``answer`` sub-command."""
    parser = commands.add_parser(
        "answer",
        help="answer a question about an image (reasoning streams, answer last)",
        description=(
            "Runs the Thyme agent on one image (or several, for one question): the model reasons, writes Python "
            "that the sandbox runs, sees the crops it made, and answers. Choose the model with --model (a hub id "
            "or a local directory, loaded with transformers), --endpoint (an OpenAI-compatible server such as "
            "vLLM) or --scripted (replay recorded model text, no weights needed)."
        ),
    )
    parser.add_argument(
        "inputs",
        nargs="+",
        metavar="IMAGE [IMAGE ...] QUESTION",
        help="one or more image files, then the question (quote it); with -q every positional is an image",
    )
    parser.add_argument("-q", "--question", help="the question, when you prefer to give it as a flag")
    add_model_arguments(parser, required=True)
    parser.add_argument("--json", action="store_true", help="print one JSON object (answer + trajectory) only")
    parser.add_argument("--save-dir", type=Path, metavar="DIR", help="keep the sandbox images and trajectory.json")
    add_loop_arguments(parser, max_attempts=2, max_attempts_help="attempts before the fallback (2)")
    parser.set_defaults(handler=run_answer)


def split_inputs(args: argparse.Namespace) -> tuple[list[Path], str]:
    """The image paths and the question from ``IMAGE [IMAGE ...] QUESTION`` or ``IMAGE [IMAGE ...] -q QUESTION``.

    Raises:
        ConfigError: no image, or no question.
    """
    from thyme.errors import ConfigError

    inputs = list(args.inputs)
    question = args.question
    if question is None:
        if len(inputs) < 2:
            raise ConfigError("give the image(s) and then the question: thyme answer IMAGE [IMAGE ...] 'QUESTION'")
        question = inputs.pop()
    return [Path(path) for path in inputs], question


def _build_backend(args: argparse.Namespace) -> Any:
    from thyme.backends import BACKENDS

    check_model_name(args)
    if args.scripted:
        return BACKENDS["scripted"](args.scripted)
    if args.endpoint:
        return BACKENDS["openai"](args.endpoint, model=args.model_name)
    return load_model_backend(args)


def replay_note(script: Path, image: Path) -> str:
    """What ``--scripted`` is, said before the replay: recorded text answers, whatever the image and question."""
    recorded_on = None
    try:
        data = json.loads(script.read_text(encoding="utf-8"))
        recorded_on = data.get("image") if isinstance(data, dict) else None
    except (OSError, json.JSONDecodeError):
        pass  # the backend reads the script next and names what is wrong with it
    note = (
        f"note: scripted replay of {script}: no model runs; the recorded model text is replayed through the real "
        "loop and sandbox, whatever the image and question"
    )
    if recorded_on and Path(str(recorded_on)).name != image.name:
        note += f" (it was recorded on {Path(str(recorded_on)).name}, so its answer is not about {image.name})"
    return note


class _ProgressBackend:
    """Wraps a real backend to say on stderr when a generation call starts and what it produced: a local model can
    take minutes per call, and the text only appears when the call ends."""

    def __init__(self, backend: Any, err: TextIO) -> None:
        self.backend = backend
        self.err = err
        self.calls = 0

    def generate(self, messages: list[dict], *, stop: Any, sampling: Any) -> Any:
        self.calls += 1
        self.err.write(f"[call {self.calls}: generating up to {sampling.max_new_tokens} tokens...]\n")
        self.err.flush()
        start = time.monotonic()
        generation = self.backend.generate(messages, stop=stop, sampling=sampling)
        tokens = f"{len(generation.token_ids)} tokens " if generation.token_ids is not None else ""
        self.err.write(
            f"[call {self.calls}: {tokens}in {time.monotonic() - start:.1f} s, {generation.finish_reason}]\n"
        )
        self.err.flush()
        return generation

    def __getattr__(self, name: str) -> Any:
        return getattr(self.backend, name)  # close(), pixel_limits and the rest of the backend


class BlankLineSqueezer:
    """Everything ``answer`` prints goes through here: the model's text streams as it comes, but at most one blank
    line in a row is shown. An untrained model (the tiny dry-run model) writes thousands of newlines, which look like a
    hung terminal. The trajectory keeps the text as written."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self._held = ""  # whitespace of a line with no text yet
        self._line_open = False  # the current line already has text on screen
        self._blank_run = 0

    def write(self, text: str) -> None:
        for piece in re.split(r"(\n)", text):
            if piece == "\n":
                if self._line_open:
                    self.out.write("\n")
                    self._line_open, self._blank_run = False, 0
                else:
                    self._held = ""
                    self._blank_run += 1
                    if self._blank_run == 1:
                        self.out.write("\n")
            elif piece:
                if self._line_open:
                    self.out.write(piece)
                elif piece.strip():
                    self.out.write(self._held + piece)
                    self._held, self._line_open = "", True
                else:
                    self._held += piece
        self.out.flush()


def _describe_image(path: str, show_path: bool) -> str:
    from PIL import Image

    with Image.open(path) as image:
        size = f"{image.width}x{image.height}"
    return f"[sandbox image {size}: {path}]" if show_path else f"[sandbox image {size}]"


def _print_event(event: Any, out: BlankLineSqueezer, show_paths: bool) -> None:
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


def tokens_generated(result: Any) -> int | None:
    """New tokens over every attempt, or None when the backend does not report token ids (a replay, a server)."""
    from thyme.trajectory import ModelText

    counts = [
        segment.generation.token_ids
        for trajectory in result.attempts
        for segment in trajectory.segments
        if isinstance(segment, ModelText) and segment.generation is not None
    ]
    if not counts or any(ids is None for ids in counts):
        return None
    return sum(len(ids) for ids in counts)


def run_summary(result: Any) -> str:
    """One line that shows the loop ran: calls, tokens, code blocks, and why it stopped."""
    tokens = tokens_generated(result)
    parts = [f"{result.generation_calls} generation call(s)"]
    if tokens is not None:
        parts.append(f"{tokens} new tokens")
    parts.append(f"{result.code_runs} code block(s) run ({result.code_errors} failed)")
    parts.append(f"{len(result.attempts)} attempt(s){' incl. the fallback' if result.used_fallback else ''}")
    parts.append(f"stop reason: {result.stop_reason}")
    return "[" + ", ".join(parts) + "]"


def _report(result: Any, args: argparse.Namespace, out: BlankLineSqueezer) -> None:
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
            "tokens_generated": tokens_generated(result),
            "scripted": bool(args.scripted),
            "trajectory": result.trajectory.to_dict(),
        }
        print(json.dumps(summary, ensure_ascii=False))
        return
    out.write(f"\n\n{run_summary(result)}\nAnswer: {result.answer}\n")
    if args.save_dir:
        images = len(result.trajectory.sandbox_images)
        out.write(f"saved: {args.save_dir / 'trajectory.json'} and {images} sandbox image(s) in {args.save_dir}\n")


def run_answer(args: argparse.Namespace) -> int:
    """Builds the agent from the flags, streams the run, prints the answer (or JSON), saves if asked.

    Returns 0 also when the model gave no answer: that is a defined outcome (``has_answer`` false, the original's
    "No answer tag found" text as the answer), not a failure of the command.
    """
    from thyme.agent import ThymeAgent
    from thyme.loop import Finished

    images, question = split_inputs(args)  # before any model is loaded
    with tempfile.TemporaryDirectory(prefix="thyme-answer-") as scratch:
        config = agent_config_from_args(args, images_dir=args.save_dir or Path(scratch))
        agent = ThymeAgent(_build_backend(args), config=config)
        if args.model:
            agent.config = with_model_pixel_limits(config, args, agent.backend)
        if not args.scripted:
            agent.backend = _ProgressBackend(agent.backend, sys.stderr)
        out = BlankLineSqueezer(sys.stdout)
        with agent:
            for number, event in enumerate(agent.stream(images if len(images) > 1 else images[0], question)):
                if number == 0 and args.scripted:  # the images and script were read: the replay is about to run
                    print(replay_note(args.scripted, Path(images[0])), file=sys.stderr, flush=True)
                if not args.json:
                    _print_event(event, out, show_paths=args.save_dir is not None)
                if isinstance(event, Finished):
                    _report(event.result, args, out)
    return 0
