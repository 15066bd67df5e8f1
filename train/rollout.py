"""Batch adapter over :func:`thyme.loop.run_rollout`: one RL generation batch -> per-sample training samples.

Each sample runs THE rollout loop (ATS, sandbox session, ``<sandbox_output>`` inside the assistant message, budget
of generation calls) with its own :class:`~thyme.train.policy.PolicyBackend`, which records the token ids, the
temperature-1 log-probs, the tool mask and the images. Samples run in a thread pool: while one waits for its code
in the sandbox (a worker process, so the GIL is free), another generates; model calls take a shared lock. The time
each sample spends waiting on the sandbox is measured, so the trainer can report the sandbox-wait share.

A failure belongs to its sample (reference 3.2 describes the original replacing the WHOLE batch on any exception):
the sample keeps its prompt, gets an empty end-of-turn completion that is never trained on, scores 0, and is
counted in ``rollout/failed``.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from thyme.backends.base import FINISH_LENGTH
from thyme.config import AgentConfig
from thyme.errors import ThymeError
from thyme.loop import STOP_ANSWER, STOP_BUDGET, STOP_REPETITION, Finished, RolloutRequest, new_trajectory, run_rollout
from thyme.sandbox.errors import SandboxError
from thyme.train.policy import PolicyBackend, TrajectoryTokens
from thyme.trajectory import Trajectory

logger = logging.getLogger(__name__)

STOP_FAILED = "failed"
# Ends of a trajectory that cut it short rather than finish it (the truncation-rate metric).
TRUNCATED_STOPS = (STOP_BUDGET, STOP_REPETITION)


class SandboxErrorRateError(ThymeError, RuntimeError):
    """Too many recent code blocks failed in the sandbox: training would silently learn to avoid code."""


@dataclass
class RolloutSample:
    """One finished rollout of a generation batch.

    Args:
        tokens: what the loss consumes (prompt/completion ids, log-probs, tool mask, images).
        trajectory: the loop's trajectory (None when the rollout failed before it started).
        stop_reason: the loop's ``STOP_*`` reason, or ``"failed"``.
        code_runs / code_errors: code blocks run, and those whose sandbox result was an error.
        generation_calls: backend calls made.
        sandbox_wait_s: wall time spent inside sandbox calls; wall_s: the whole rollout.
        error: why the rollout failed (None when it did not).
    """

    tokens: TrajectoryTokens
    trajectory: Trajectory | None
    stop_reason: str
    code_runs: int = 0
    code_errors: int = 0
    generation_calls: int = 0
    sandbox_wait_s: float = 0.0
    wall_s: float = 0.0
    error: str | None = None

    @property
    def truncated(self) -> bool:
        """Cut short: budget used up, a repetition loop, or the last call hit its token cap without an answer."""
        return self.trajectory is not None and _is_cut_short(self.stop_reason, self.trajectory)


class _TimedSession:
    """A sandbox session that adds the wall time of each ``run`` to its owner's counter."""

    def __init__(self, session: Any, clock: list[float]):
        self._session = session
        self._clock = clock
        self.scratch_dir = session.scratch_dir
        self.results_dir = getattr(session, "results_dir", session.scratch_dir)
        self.input_paths = session.input_paths

    def run(self, code: str) -> Any:
        start = time.perf_counter()
        try:
            return self._session.run(code)
        finally:
            self._clock[0] += time.perf_counter() - start

    def close(self) -> None:
        self._session.close()

    def __enter__(self) -> _TimedSession:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class _TimedSandbox:
    """The loop's sandbox, with every session timed (the loop only calls ``session(...)``)."""

    def __init__(self, sandbox: Any):
        self._sandbox = sandbox
        self.wait_s = [0.0]

    def session(self, **kwargs: Any) -> _TimedSession:
        start = time.perf_counter()
        session = self._sandbox.session(**kwargs)
        self.wait_s[0] += time.perf_counter() - start
        return _TimedSession(session, self.wait_s)


def _is_cut_short(stop_reason: str, trajectory: Trajectory) -> bool:
    if stop_reason in TRUNCATED_STOPS:
        return True
    generations = trajectory.generations
    return stop_reason != STOP_ANSWER and bool(generations) and generations[-1].finish_reason == FINISH_LENGTH


def _finished(events) -> Any:
    for event in events:
        if isinstance(event, Finished):
            return event.result
    raise ThymeError("the rollout loop ended without a Finished event")


def run_one(request: RolloutRequest, backend: PolicyBackend, sandbox: Any, config: AgentConfig) -> RolloutSample:
    """Runs one rollout through the loop; a backend, image, protocol or sandbox failure becomes a failed sample.

    Args:
        request: the question, the input image and the folder for sandbox images.
        backend: this sample's policy backend (fresh: it records one trajectory).
        sandbox: the shared ``thyme.sandbox.Sandbox`` (or remote pool).
        config: the loop settings (one attempt, no fallback, errors shown to the model).
    """
    timed = _TimedSandbox(sandbox)
    start = time.perf_counter()
    try:
        result = _finished(run_rollout(backend, timed, request, config))
        truncated = _is_cut_short(result.stop_reason, result.trajectory)
        tokens = backend.finish(answered=result.stop_reason == STOP_ANSWER, truncated=truncated)
    except (ThymeError, SandboxError, OSError) as exc:
        logger.warning("rollout of %s failed: %s", request.item_id or request.image_path, exc)
        if backend.tokens is None:
            backend.start(prompt_messages(request, config))
        return RolloutSample(
            tokens=backend.failed_sample(),
            trajectory=None,
            stop_reason=STOP_FAILED,
            sandbox_wait_s=timed.wait_s[0],
            wall_s=time.perf_counter() - start,
            error=f"{type(exc).__name__}: {exc}",
        )
    return RolloutSample(
        tokens=tokens,
        trajectory=result.trajectory,
        stop_reason=result.stop_reason,
        code_runs=result.code_runs,
        code_errors=result.code_errors,
        generation_calls=result.generation_calls,
        sandbox_wait_s=timed.wait_s[0],
        wall_s=time.perf_counter() - start,
    )


def run_batch(
    requests: Sequence[RolloutRequest],
    make_backend: Callable[[int], PolicyBackend],
    sandbox: Any,
    config: AgentConfig,
    *,
    workers: int,
) -> list[RolloutSample]:
    """Runs every request through the loop, ``workers`` at a time, and returns the samples in request order."""
    jobs = [(request, make_backend(index)) for index, request in enumerate(requests)]
    if workers <= 1 or len(jobs) <= 1:
        return [run_one(r, b, sandbox, config) for r, b in jobs]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="thyme-rollout") as pool:
        futures = [pool.submit(run_one, r, b, sandbox, config) for r, b in jobs]
        return [future.result() for future in futures]


class RolloutImagesDir:
    """A temporary folder for one batch's sandbox images; removed once their pixels are in memory."""

    def __init__(self) -> None:
        self.path = Path(tempfile.mkdtemp(prefix="thyme-rl-images-"))

    def for_sample(self, index: int) -> Path:
        return self.path / f"sample{index}"

    def __enter__(self) -> RolloutImagesDir:
        return self

    def __exit__(self, *exc_info: object) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


@dataclass
class BatchStats:
    """Per-batch rollout metrics (logged under ``thyme/``)."""

    code_blocks_per_trajectory: float
    sandbox_error_rate: float
    turns: float
    truncation_rate: float
    sandbox_wait_share: float
    failed: float
    images_per_trajectory: float
    answered: float

    @classmethod
    def of(cls, samples: Sequence[RolloutSample]) -> BatchStats:
        n = max(1, len(samples))
        runs = sum(s.code_runs for s in samples)
        wall = sum(s.wall_s for s in samples)
        return cls(
            code_blocks_per_trajectory=runs / n,
            sandbox_error_rate=sum(s.code_errors for s in samples) / runs if runs else 0.0,
            turns=sum(s.generation_calls for s in samples) / n,
            truncation_rate=sum(s.truncated for s in samples) / n,
            sandbox_wait_share=sum(s.sandbox_wait_s for s in samples) / wall if wall > 0 else 0.0,
            failed=sum(s.stop_reason == STOP_FAILED for s in samples) / n,
            images_per_trajectory=sum(max(0, len(s.tokens.images) - 1) for s in samples) / n,
            answered=sum(s.stop_reason == STOP_ANSWER for s in samples) / n,
        )


def sandbox_outcomes(samples: Sequence[RolloutSample]) -> tuple[int, int, list[str]]:
    """(failed blocks, blocks, distinct error texts) of a batch's code blocks."""
    outputs = [o for s in samples if s.trajectory is not None for o in s.trajectory.sandbox_outputs]
    errors = [o.error for o in outputs if o.error]
    return len(errors), len(outputs), list(dict.fromkeys(errors))


class SandboxHealth:
    """Fails fast when the share of failed code blocks over about the last ``window`` blocks exceeds ``max_rate``.

    A sandbox that cannot run anything (a missing module, a bad mount) gives every block an error; the model then
    learns that code never helps and RL quietly becomes tool-less training. Stopping with the last errors in the
    message is cheaper than finding that out after the run. Counts come per batch (summed over processes by the
    trainer, so every process takes the same decision); the window keeps whole batches.
    """

    def __init__(self, max_rate: float, window: int, min_blocks: int):
        self._max_rate = max_rate
        self._min_blocks = min_blocks
        self._window = window
        self._batches: deque[tuple[int, int]] = deque()

    def record(self, failed: int, total: int, errors: Sequence[str] = ()) -> None:
        """Adds one batch's counts and raises when the recent error rate is too high.

        Raises:
            SandboxErrorRateError: more than ``max_rate`` of the recent blocks failed (the message quotes errors).
        """
        self._batches.append((failed, total))
        while len(self._batches) > 1 and sum(t for _, t in self._batches) - self._batches[0][1] >= self._window:
            self._batches.popleft()
        bad, count = sum(f for f, _ in self._batches), sum(t for _, t in self._batches)
        if count >= self._min_blocks and bad / count > self._max_rate:
            examples = "; ".join(errors)[:600]
            raise SandboxErrorRateError(
                f"{bad} of the last {count} code blocks failed in the sandbox ({bad / count:.0%} > "
                f"max_sandbox_error_rate {self._max_rate:.0%}); recent errors: {examples or 'n/a'}. Check the "
                "sandbox (thyme sandbox run) or raise max_sandbox_error_rate"
            )


def prompt_messages(request: RolloutRequest, config: AgentConfig) -> list[dict]:
    """The [system, user] messages the loop starts ``request`` with (the prompt of a sample that failed early)."""
    return new_trajectory(request, config).to_messages()
