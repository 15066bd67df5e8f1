"""THE rollout loop (design.md section 2): the agent, the evaluator, the demo and the RL trainer all run this code.

One attempt: render the trajectory -> ``backend.generate`` until ``</code>`` / ``</answer>`` / end of turn -> if the
text closed a code block, run it in a fresh sandbox session of this attempt and append ``<sandbox_output>`` (images,
else text, else the ``Sandbox for <id>: ...`` error) inside the same assistant message -> generate again, up to
``config.max_generation_calls`` backend calls. The original's defects are fixed (reference 1.8): every call continues
the assistant message (no lost header after a failure), sandbox errors are shown to the model unless
``show_sandbox_errors=False``, and retries sample (the original's "retries" were greedy again, hence no-ops). After
``max_attempts`` failed attempts, the plain fallback prompt is asked once (``use_fallback``).

Budget: ``max_generation_calls`` counts backend ``generate`` calls per attempt, as the original RL's
``GEN_ITER_LIMIT``. Greedy: a code round is one call. ATS (``sampling='ats'``): a code round is two calls, prose
sampled until ``<code>``, then code greedy until ``</code>`` (reference 3.2), so 5 calls allow text, code, text, code,
answer. Retries (attempts after the first) sample prose with the ATS settings even when ``sampling='greedy'``.

An attempt ends with one of the ``STOP_*`` reasons: ``answer`` (success), ``eos`` (turn ended without an answer),
``empty`` (the backend returned nothing), ``budget`` (calls used up: e.g. a model that never closes ``<code>``),
``repetition`` (a length-capped call ended in a loop), ``malformed_code`` (``</code>`` without a code block),
``context`` (the model's context window is full: the backend had no room for a single new token).
A backend that ignores stop strings is cut after the first stop string (so a second ``<answer>`` never counts).
Image paths the sandbox returns outside its scratch directory are refused (logged, never shown to the model).

Events, yielded in this order (all frozen dataclasses; the last one is always :class:`Finished`):

- :class:`AttemptStarted` ``(attempt, fallback, trajectory)``: a new trajectory begins (``attempt`` counts from 1;
  the fallback has ``fallback=True``). ``trajectory`` is the live object that later events extend.
- :class:`TextGenerated` ``(segment, call_index)``: one backend call's :class:`~thyme.trajectory.ModelText`, already
  appended; ``segment.generation`` holds its token ids / log-probs, ``segment.sampling`` its sampling.
- :class:`CodeStarted` ``(code)``: a complete code block is about to run.
- :class:`SandboxFinished` ``(code, output, hidden)``: its :class:`~thyme.trajectory.SandboxOutput` (images already
  copied into the images dir). ``hidden=True``: an error with ``show_sandbox_errors=False``; neither the output
  nor its code block stay in the trajectory.
- :class:`AttemptFinished` ``(attempt, stop_reason, trajectory)``: the attempt ended (``stop_reason`` is one of
  ``STOP_*``; ``answer`` means success).
- :class:`Finished` ``(result)``: the :class:`RolloutResult`.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from thyme.backends.base import FINISH_LENGTH, Backend, Generation, SamplingParams
from thyme.config import AgentConfig
from thyme.prompts import FALLBACK_SYSTEM_PROMPT, SYSTEM_PROMPT, fallback_prompt, user_prompt_images, user_text_item
from thyme.protocol import (
    ANSWER_CLOSE,
    ATS_CODE_STOP_STRINGS,
    ATS_PROSE_STOP_STRINGS,
    CODE_BLOCK_RE,
    CODE_CLOSE,
    CODE_OPEN,
    MISSING_ANSWER,
    SANDBOX_OUTPUT_CLOSE,
    STOP_STRINGS,
    extract_answer,
    wrap_answer,
)
from thyme.trajectory import ModelText, SandboxOutput, Trajectory

logger = logging.getLogger(__name__)

STOP_ANSWER = "answer"
STOP_EOS = "eos"
STOP_EMPTY = "empty"
STOP_BUDGET = "budget"
STOP_REPETITION = "repetition"
STOP_MALFORMED_CODE = "malformed_code"
STOP_CONTEXT = "context"
# Longest repeated unit the repetition check looks for (characters).
_MAX_REPEAT_UNIT = 200


@dataclass(frozen=True)
class AttemptStarted:
    attempt: int
    fallback: bool
    trajectory: Trajectory


@dataclass(frozen=True)
class TextGenerated:
    segment: ModelText
    call_index: int


@dataclass(frozen=True)
class CodeStarted:
    code: str


@dataclass(frozen=True)
class SandboxFinished:
    code: str
    output: SandboxOutput
    hidden: bool = False


@dataclass(frozen=True)
class AttemptFinished:
    attempt: int
    stop_reason: str
    trajectory: Trajectory


@dataclass
class RolloutResult:
    """The outcome of one question.

    Args:
        answer (`str`): the parsed answer; :data:`~thyme.protocol.MISSING_ANSWER` when none was found.
        has_answer (`bool`): whether an answer was found (in an attempt or the fallback).
        trajectory (`Trajectory`): the trajectory the answer came from (the last attempt, or the fallback).
        attempts (`list[Trajectory]`): every trajectory run, in order, the final one included.
        stop_reason (`str`): the last attempt's ``STOP_*`` reason (``answer`` also for an answered fallback).
        used_fallback (`bool`): whether the fallback prompt produced ``trajectory``.
        generation_calls (`int`): backend calls over all attempts.
        code_runs (`int`): code blocks run; ``code_errors``: those that returned an error.
        images_dir (`Path`, *optional*): where the trajectories' sandbox images are kept.
    """

    answer: str
    has_answer: bool
    trajectory: Trajectory
    attempts: list[Trajectory]
    stop_reason: str
    used_fallback: bool = False
    generation_calls: int = 0
    code_runs: int = 0
    code_errors: int = 0
    images_dir: Path | None = None


@dataclass(frozen=True)
class Finished:
    result: RolloutResult


Event = AttemptStarted | TextGenerated | CodeStarted | SandboxFinished | AttemptFinished | Finished


@dataclass
class RolloutRequest:
    """What one rollout needs besides the backend and config.

    Args:
        question (`str`): the (already formatted) question.
        image_path (`str`): the ORIGINAL input file; the sandbox session reads it.
        width (`int`, *optional*): original width for the prompt (None: "Unable to determine").
        height (`int`, *optional*): original height.
        images_dir (`Path`): where sandbox images are copied so they outlive the sandbox session.
        item_id (`str`, *optional*): the id in ``Sandbox for <id>:`` errors; default: the image's file stem.
        more_images (`list[tuple[str, int | None, int | None]]`): further input images after the first, as
            ``(path, width, height)``; the model sees them all, in order, and the sandbox session gets them all
            (``thyme.prompts.user_prompt_images`` says how the prompt names them).
    """

    question: str
    image_path: str
    width: int | None
    height: int | None
    images_dir: Path
    item_id: str | None = None
    more_images: list[tuple[str, int | None, int | None]] = field(default_factory=list)

    @property
    def input_images(self) -> list[tuple[str, int | None, int | None]]:
        """Every input image as ``(path, width, height)``, the first one included."""
        return [(self.image_path, self.width, self.height), *self.more_images]


class _Counters:
    def __init__(self) -> None:
        self.calls = self.code_runs = self.code_errors = 0


def is_repetitive(text: str, min_chars: int) -> bool:
    """True when the last ``min_chars`` characters of ``text`` repeat a unit of at most 200 characters at least
    twice (a model stuck in a loop until ``max_new_tokens``). Written by hand: the original's check was a
    brute-force substring count (reference 3.2) and no library offers a periodicity test on text."""
    if min_chars <= 0 or len(text) < min_chars:
        return False
    tail = text[-min_chars:]
    for unit in range(1, min(_MAX_REPEAT_UNIT, min_chars // 2) + 1):
        if tail[unit:] == tail[:-unit]:
            return True
    return False


def _cut_at_stop(text: str, stop: tuple[str, ...]) -> str:
    """Cuts after the earliest stop string: a backend that ignored its stops must not smuggle in a 2nd block."""
    ends = [text.find(s) + len(s) for s in stop if s in text]
    return text[: min(ends)] if ends else text


def _pending_code(trajectory: Trajectory) -> str | None:
    """The code block that closes at the end of the assistant text since the last sandbox output, if any (under ATS
    it spans two calls)."""
    text = trajectory.text
    last_output = text.rfind(SANDBOX_OUTPUT_CLOSE)
    tail = text if last_output < 0 else text[last_output + len(SANDBOX_OUTPUT_CLOSE) :]
    matches = list(CODE_BLOCK_RE.finditer(tail))
    if matches and matches[-1].end() == len(tail):
        return matches[-1].group(1).strip()
    return None


def _choose_call(trajectory: Trajectory, config: AgentConfig, sampled: bool) -> tuple[SamplingParams, tuple[str, ...]]:
    """Sampling policy: greedy everywhere, or ATS (prose sampled until <code>, code greedy until </code>)."""
    if not sampled:
        return config.greedy_sampling(), STOP_STRINGS
    if trajectory.text.rstrip().endswith(CODE_OPEN):
        return config.greedy_sampling(), ATS_CODE_STOP_STRINGS
    return config.prose_sampling(), ATS_PROSE_STOP_STRINGS


def _keep_images(paths: list[str], scratch_dir: Path, images_dir: Path, prefix: str) -> list[str]:
    """Copies the sandbox's images out of the session's scratch dir (it is deleted on close); refuses any path
    outside it, so a model printing /etc/... never gets a host file shown as an image."""
    kept = []
    scratch = scratch_dir.resolve()
    for index, path in enumerate(paths):
        source = Path(path).resolve()
        if not source.is_relative_to(scratch) or not source.is_file():
            logger.warning("ignoring sandbox image outside the session scratch dir: %s", path)
            continue
        target = images_dir / f"{prefix}_{index}_{source.name}"
        duplicate = 1
        while target.exists():  # a shared images_dir (several questions): never overwrite an earlier image
            target = images_dir / f"{prefix}_{index}_{duplicate}_{source.name}"
            duplicate += 1
        shutil.copyfile(source, target)
        kept.append(str(target))
    return kept


def _sandbox_output(result: Any, scratch_dir: Path, images_dir: Path, prefix: str) -> SandboxOutput:
    images = _keep_images(list(result.images), scratch_dir, images_dir, prefix)
    stdout = result.stdout or ""
    if images:
        return SandboxOutput(images=images, stdout=stdout, result=result)
    if result.error:
        return SandboxOutput(error=result.error, stdout=stdout, result=result)
    return SandboxOutput(text=stdout.strip(), stdout=stdout, result=result)


def _run_attempt(
    backend: Backend,
    session: Any,
    request: RolloutRequest,
    config: AgentConfig,
    trajectory: Trajectory,
    attempt: int,
    sampled: bool,
    counters: _Counters,
) -> Iterator[Event]:
    """Runs one attempt's generation calls in its sandbox session; returns the stop reason."""
    for call_index in range(config.max_generation_calls):
        sampling, stop = _choose_call(trajectory, config, sampled)
        generation: Generation = backend.generate(trajectory.to_messages(), stop=stop, sampling=sampling)
        counters.calls += 1
        text = _cut_at_stop(generation.text, stop)
        if not text:
            return STOP_CONTEXT if generation.finish_reason == FINISH_LENGTH else STOP_EMPTY
        segment = ModelText(text, generation, sampling)
        trajectory.segments.append(segment)
        yield TextGenerated(segment, call_index)
        if ANSWER_CLOSE in text and extract_answer(trajectory.text) is not None:
            return STOP_ANSWER
        if text.endswith(CODE_CLOSE):
            code = _pending_code(trajectory)
            if code is None:
                return STOP_MALFORMED_CODE
            yield from _execute(session, code, request, config, trajectory, f"a{attempt}_c{call_index}", counters)
            continue
        if sampled and text.rstrip().endswith(CODE_OPEN):
            continue  # ATS: the code itself comes from the next, greedy call
        if generation.finish_reason != FINISH_LENGTH:
            return STOP_EOS
        if is_repetitive(trajectory.text, config.repetition_min_chars):
            return STOP_REPETITION
    return STOP_BUDGET


def _execute(
    session: Any,
    code: str,
    request: RolloutRequest,
    config: AgentConfig,
    trajectory: Trajectory,
    prefix: str,
    counters: _Counters,
) -> Iterator[Event]:
    """Runs one code block and appends its output (or, with hidden errors, drops the block as the original eval)."""
    yield CodeStarted(code)
    result = session.run(code)
    counters.code_runs += 1
    # A local session hands out checked copies in its results_dir; a remote one downloads into its scratch_dir.
    output = _sandbox_output(
        result, Path(getattr(session, "results_dir", session.scratch_dir)), request.images_dir, prefix
    )
    counters.code_errors += output.error is not None
    hidden = output.error is not None and not config.show_sandbox_errors
    if hidden:
        trajectory.segments.pop()
        last = trajectory.segments[-1] if trajectory.segments else None
        if isinstance(last, ModelText) and last.text.rstrip().endswith(CODE_OPEN):
            trajectory.segments.pop()  # ATS: the prose call that opened the dropped block goes too
    else:
        trajectory.segments.append(output)
    yield SandboxFinished(code, output, hidden)


def new_trajectory(
    request: RolloutRequest,
    config: AgentConfig,
    *,
    prompt_path: str | None = None,
    fallback: bool = False,
    prompt_paths: list[str] | None = None,
) -> Trajectory:
    """The [system, user] start of a trajectory: the official prompts, or the fallback conversation.

    Args:
        prompt_path (`str`, *optional*): the image path the prompt tells the model, i.e. the path the sandbox
            session gives the code (``session.input_paths[0]``); default: ``request.image_path``. The image item
            itself always points at the original file.
        prompt_paths (`list[str]`, *optional*): the same for every input image (several images), in order.
    """
    images = request.input_images
    if fallback:
        system, text = FALLBACK_SYSTEM_PROMPT, fallback_prompt(request.question)
    else:
        paths = prompt_paths or [prompt_path or request.image_path] + [path for path, _, _ in images[1:]]
        named = [(path, width, height) for path, (_, width, height) in zip(paths, images, strict=True)]
        prompt = user_prompt_images(request.question, named)
        system, text = SYSTEM_PROMPT, user_text_item(prompt, eval_image_quirk=config.eval_image_quirk)
    return Trajectory(
        system_prompt=system,
        user_text=text,
        image_paths=[path for path, _, _ in images],
        image_options=config.image_options,
        question=request.question,
    )


def _run_fallback(backend: Backend, request: RolloutRequest, config: AgentConfig, counters: _Counters):
    """One plain call without stop strings (reference 1.4 step 3); a reply without tags becomes the answer."""
    trajectory = new_trajectory(request, config, fallback=True)
    trajectory.metadata.update(attempt="fallback", fallback=True)
    yield AttemptStarted(0, True, trajectory)
    sampling = config.greedy_sampling()
    generation = backend.generate(trajectory.to_messages(), stop=(), sampling=sampling)
    counters.calls += 1
    if generation.text:
        segment = ModelText(generation.text, generation, sampling)
        trajectory.segments.append(segment)
        yield TextGenerated(segment, 0)
    answer = extract_answer(wrap_answer(generation.text.strip())) if generation.text.strip() else None
    reason = STOP_ANSWER if answer else (STOP_EMPTY if not generation.text.strip() else STOP_EOS)
    trajectory.metadata["stop_reason"] = reason
    yield AttemptFinished(0, reason, trajectory)
    return trajectory, answer


def _open_session(sandbox: Any, request: RolloutRequest, item_id: str) -> Any:
    """A sandbox session over every input image (``images=`` only when there are several, so a sandbox that knows
    only ``image=`` keeps working for single-image questions); the same file given twice is copied once."""
    if not request.more_images:
        return sandbox.session(image=request.image_path, item_id=item_id)
    unique = list(dict.fromkeys(path for path, _, _ in request.input_images))
    return sandbox.session(images=unique, item_id=item_id)


def _prompt_paths(request: RolloutRequest, session: Any) -> list[str]:
    """The path the session gives the code for each input image, in input order."""
    unique = list(dict.fromkeys(path for path, _, _ in request.input_images))
    copies = dict(zip(unique, session.input_paths, strict=True))
    return [copies[path] for path, _, _ in request.input_images]


def run_rollout(backend: Backend, sandbox: Any, request: RolloutRequest, config: AgentConfig) -> Iterator[Event]:
    """Answers one question; yields the events of the module docstring, the last one being :class:`Finished`.

    Args:
        backend (`Backend`): produces the model text.
        sandbox (`thyme.sandbox.Sandbox`): runs the code; one session per attempt.
        request (`RolloutRequest`): the question, the input image and where to keep sandbox images.
        config (`AgentConfig`): budget, sampling and failure handling.

    Raises:
        BackendError: the backend failed (network, model); a model's bad output never raises.
        SandboxError: the sandbox infrastructure failed; errors in the model's code are data.
    """
    request.images_dir.mkdir(parents=True, exist_ok=True)
    counters = _Counters()
    item_id = request.item_id or Path(request.image_path).stem
    attempts: list[Trajectory] = []
    reason = STOP_BUDGET
    for attempt in range(1, config.max_attempts + 1):
        sampled = config.sampling == "ats" or attempt > 1
        # A fresh session per attempt: no variables leak from a failed attempt (the original reset its context).
        with _open_session(sandbox, request, item_id) as session:
            trajectory = new_trajectory(request, config, prompt_paths=_prompt_paths(request, session))
            trajectory.metadata["attempt"] = attempt
            attempts.append(trajectory)
            yield AttemptStarted(attempt, False, trajectory)
            reason = yield from _run_attempt(backend, session, request, config, trajectory, attempt, sampled, counters)
        trajectory.metadata["stop_reason"] = reason
        yield AttemptFinished(attempt, reason, trajectory)
        if reason == STOP_ANSWER:
            answer = extract_answer(trajectory.text)
            yield Finished(_result(answer, trajectory, attempts, reason, False, counters, request.images_dir))
            return
        logger.info("attempt %d for %s ended without an answer (%s)", attempt, request.image_path, reason)
    if config.use_fallback:
        trajectory, answer = yield from _run_fallback(backend, request, config, counters)
        attempts.append(trajectory)
        reason = STOP_ANSWER if answer else reason
        yield Finished(_result(answer, trajectory, attempts, reason, True, counters, request.images_dir))
        return
    yield Finished(_result(None, attempts[-1], attempts, reason, False, counters, request.images_dir))


def _result(answer, trajectory, attempts, reason, fallback, counters, images_dir) -> RolloutResult:
    return RolloutResult(
        answer=MISSING_ANSWER if answer is None else answer,
        has_answer=answer is not None,
        trajectory=trajectory,
        attempts=attempts,
        stop_reason=reason,
        used_fallback=fallback,
        generation_calls=counters.calls,
        code_runs=counters.code_runs,
        code_errors=counters.code_errors,
        images_dir=images_dir,
    )


__all__ = [
    "STOP_ANSWER",
    "STOP_BUDGET",
    "STOP_CONTEXT",
    "STOP_EMPTY",
    "STOP_EOS",
    "STOP_MALFORMED_CODE",
    "STOP_REPETITION",
    "AttemptFinished",
    "AttemptStarted",
    "CodeStarted",
    "Event",
    "Finished",
    "RolloutRequest",
    "RolloutResult",
    "SandboxFinished",
    "TextGenerated",
    "is_repetitive",
    "new_trajectory",
    "run_rollout",
]
