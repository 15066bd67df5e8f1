"""Runs a model over a benchmark, with the Thyme tool loop or without it, and writes the results.

The two modes share everything but the answering step, so a reported gain is a delta measured in one harness:

- ``thyme``: :class:`~thyme.agent.ThymeAgent` answers with the official Thyme prompts and the sandbox (the paper's
  setting, greedy by default as the original eval);
- ``direct``: the same backend answers the same formatted question in one plain generation, no system prompt and no
  tools, as VLMEvalKit evaluates the base Qwen2.5-VL the paper compares against.

Questions are formatted per type as VLMEvalKit's Thyme prompt mixin does (reference 1.2): options and the instruction
line for multiple choice, " Please answer yes or no." for yes/no, the short-answer line otherwise.

The run is resumable: each finished row is appended to ``predictions.jsonl`` at once, and a new run with the same
``--out`` skips rows already there (rows that failed with an error run again). With ``workers > 1`` rows run in
threads, which pays off for an OpenAI-compatible server that batches concurrent requests.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import thyme
from thyme.backends.base import Backend
from thyme.config import AgentConfig
from thyme.errors import ConfigError, ImageError, ProtocolError
from thyme.evaluation.datasets import DatasetError, EvalItem, load_dataset, materialize_images
from thyme.evaluation.judging import JUDGE_CACHE_FILE, JudgeStage
from thyme.evaluation.matching import score_prediction
from thyme.evaluation.metrics import Metrics, compute_metrics
from thyme.evaluation.predictions import PREDICTIONS_FILE, Prediction, PredictionsFile
from thyme.evaluation.report import DEFAULT_REPORT_EXAMPLES, write_report, write_results
from thyme.judge import Judge
from thyme.prompts import format_mcq, format_vqa, format_yes_no
from thyme.trajectory import ModelText, Trajectory

logger = logging.getLogger(__name__)

MODES = ("thyme", "direct")
# Retries sample (thyme.loop), so one attempt keeps a greedy evaluation deterministic; the fallback prompt is greedy.
EVAL_AGENT_DEFAULTS = {"max_attempts": 1}
IMAGES_DIR = "images"  # decoded base64 inputs
CROPS_DIR = "crops"  # sandbox images, one folder per row
# Failures that belong to one row: the run records them and goes on. Backend and sandbox infrastructure errors
# are not here: they would fail every later row too, so they stop the run (resume it once fixed).
ROW_ERRORS = (DatasetError, ImageError, ProtocolError)

# Returns the backend that answers a given row: one shared backend for a model or a server, a fresh scripted one
# per row for replayed text.
BackendFor = Callable[[EvalItem], Backend]


@dataclass
class EvalConfig:
    """Settings of one evaluation run (the model's own settings live in :class:`~thyme.config.AgentConfig`)."""

    mode: str = field(default="thyme", metadata={"help": "'thyme' (tool loop) or 'direct' (one plain generation)"})
    limit: int | None = field(default=None, metadata={"help": "evaluate only the first N rows"})
    workers: int = field(default=1, metadata={"help": "rows answered concurrently (useful with --endpoint)"})
    report_examples: int = field(
        default=DEFAULT_REPORT_EXAMPLES, metadata={"help": "example trajectories rendered in report.md"}
    )
    progress: bool = field(default=True, metadata={"help": "show a progress bar on stderr"})

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"mode ({self.mode!r}) must be one of {', '.join(MODES)}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit ({self.limit}) must be at least 1")
        if self.workers < 1:
            raise ConfigError(f"workers ({self.workers}) must be at least 1")
        if self.report_examples < 0:
            raise ConfigError(f"report_examples ({self.report_examples}) must be >= 0")


@dataclass
class EvalResult:
    """What :func:`run_evaluation` returns: the scores, every prediction (in dataset order) and the files written."""

    metrics: Metrics
    predictions: list[Prediction]
    out_dir: Path
    skipped: int  # rows taken from an earlier run's predictions.jsonl


def format_by_type(
    kind: str,
    question: str,
    options: Mapping[str, str] | None = None,
    hint: str | None = None,
    *,
    instruction: bool = True,
) -> str:
    """Formats a question as VLMEvalKit's Thyme prompt mixin does for its type (reference section 1.2).

    Args:
        kind: ``"mcq"``, ``"yes_no"`` or ``"vqa"``.
        question: the raw question.
        options: letter -> text (multiple choice only).
        hint: VLMEvalKit's hint line (multiple choice only).
        instruction: add the yes/no or short-answer instruction (VLMEvalKit leaves it off for MME and MMVet).

    Raises:
        ConfigError: an unknown ``kind``.
    """
    if kind == "mcq":
        return format_mcq(question, options or {}, hint=hint)
    if kind == "yes_no":
        return format_yes_no(question, add_instruction=instruction)
    if kind == "vqa":
        return format_vqa(question, add_instruction=instruction)
    raise ConfigError(f"question type {kind!r} is not one of mcq, yes_no, vqa")


def format_question(item: EvalItem) -> str:
    """The question text a model sees for ``item``, by its question type (see :func:`format_by_type`).

    Example:
        >>> from thyme.evaluation.datasets import EvalItem
        >>> format_question(EvalItem(index="1", question="Is it red?", answer="yes"))
        'Is it red? Please answer yes or no.'
    """
    return format_by_type(item.question_type, item.question, item.options, item.hint)


def _usage(trajectories: Sequence[Trajectory]) -> tuple[int, int | None, int]:
    """(generation calls, generated tokens, prompt tokens) over every attempt of a row. Generated tokens are None
    when a backend reports no token ids (the OpenAI-compatible and scripted backends), rather than a false 0."""
    generations = [g for t in trajectories for g in t.generations]
    known = all(g.token_ids is not None for g in generations)
    generated = sum(len(g.token_ids or ()) for g in generations) if known else None
    return len(generations), generated, sum(g.prompt_tokens for g in generations)


def generate_direct(
    backend: Backend, image_path: str | Sequence[str], question: str, agent_config: AgentConfig
) -> Trajectory:
    """Asks ``question`` about the image in one plain generation: no system prompt, no tools, greedy (sampled with
    the prose settings when ``agent_config.sampling`` is ``'ats'``).

    This is the chat VLMEvalKit gives a base Qwen2.5-VL (the image, then the formatted question), so ``--mode direct``
    measures the baseline the paper compares against with the same model, backend and harness.

    Returns:
        A one-segment trajectory (empty system prompt) holding the reply and its Generation.
    """
    paths = [image_path] if isinstance(image_path, str) else list(image_path)
    items = [{"type": "image", "image": path, **agent_config.image_options} for path in paths]
    messages = [{"role": "user", "content": [*items, {"type": "text", "text": question}]}]
    # A sampled run (--sampling ats, --samples k) samples the direct reply with the same prose settings.
    sampling = agent_config.prose_sampling() if agent_config.sampling == "ats" else agent_config.greedy_sampling()
    generation = backend.generate(messages, stop=(), sampling=sampling)
    segment = ModelText(generation.text, generation, sampling)
    return Trajectory("", question, paths, [segment], dict(agent_config.image_options), question,
                      {"mode": "direct"})  # fmt: skip


def direct_answer(trajectory: Trajectory) -> str:
    """The answer of a direct reply: inside ``<answer>`` when the model used the tags (a Thyme model does), else the
    whole reply, which the matching rules then read."""
    answer = trajectory.answer
    return answer if answer is not None else trajectory.text.strip()


def _answer_direct(backend: Backend, images: list[Path], question: str, agent_config: AgentConfig) -> dict:
    trajectory = generate_direct(backend, [str(image) for image in images], question, agent_config)
    calls, generated, prompt = _usage([trajectory])
    return {
        "prediction": direct_answer(trajectory),
        "generation_calls": calls,
        "generated_tokens": generated,
        "prompt_tokens": prompt,
        "trajectory": trajectory.to_dict(),
    }


def _answer_thyme(agent: Any, item: EvalItem, images: list[Path], question: str) -> dict:
    inputs = [str(image) for image in images]
    result = agent.answer(inputs if len(inputs) > 1 else inputs[0], question, item_id=item.index)
    calls, generated, prompt = _usage(result.attempts)
    return {
        "prediction": result.answer if result.has_answer else None,
        "generation_calls": calls,
        "code_blocks": result.code_runs,
        "sandbox_errors": result.code_errors,
        "generated_tokens": generated,
        "prompt_tokens": prompt,
        "images": list(result.trajectory.sandbox_images),
        "stop_reason": result.stop_reason,
        "used_fallback": result.used_fallback,
        "trajectory": result.trajectory.to_dict(),
    }


class _RowRunner:
    """Answers one row in the configured mode and turns the outcome into a :class:`Prediction`."""

    def __init__(
        self, backend_for: BackendFor, config: EvalConfig, agent_config: AgentConfig, out_dir: Path, sandbox: Any
    ) -> None:
        self.backend_for = backend_for
        self.config = config
        self.agent_config = agent_config
        self.out_dir = out_dir
        self.sandbox = sandbox

    def __call__(self, item: EvalItem) -> Prediction:
        question = format_question(item)
        started = time.perf_counter()
        try:
            images = materialize_images(item, self.out_dir / IMAGES_DIR)
            outcome = self._answer(item, images, question)
            error = None
        except ROW_ERRORS as exc:
            logger.warning("row %s failed: %s", item.index, exc)
            outcome, error = {"prediction": None}, str(exc)
        match = score_prediction(item, outcome["prediction"])
        return Prediction(
            index=item.index,
            mode=self.config.mode,
            question_type=item.question_type,
            category=item.category,
            l2_category=item.l2_category,
            question=question,
            answer=item.answer,
            extracted=match.extracted,
            correct=match.correct,
            error=error,
            elapsed_s=round(time.perf_counter() - started, 3),
            **outcome,
        )

    def _answer(self, item: EvalItem, images: list[Path], question: str) -> dict:
        backend = self.backend_for(item)
        if self.config.mode == "direct":
            return _answer_direct(backend, images, question, self.agent_config)
        from thyme.agent import ThymeAgent

        crops = self.out_dir / CROPS_DIR / _safe_name(item.index)
        crops.mkdir(parents=True, exist_ok=True)
        config = dataclasses.replace(self.agent_config, images_dir=crops)
        agent = ThymeAgent(backend, config=config, sandbox=self.sandbox)
        return _answer_thyme(agent, item, images, question)


def _safe_name(index: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in index)


@contextmanager
def progress_bar(
    total: int, initial: int = 0, enabled: bool = True, *, desc: str = "thyme eval", unit: str = "q"
) -> Iterator[Callable[[], None]]:
    """A tqdm bar on stderr for long work (an eval, ``thyme bench synth``); yields the function that advances it."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        if enabled:
            logger.warning("tqdm is not installed, so no progress bar: pip install 'thyme-vlm[eval]'")
        enabled = False
    if not enabled:
        yield lambda: None
        return
    with tqdm(total=total, initial=initial, unit=unit, desc=desc, dynamic_ncols=True) as bar:
        yield lambda: bar.update(1)


def _run_rows(todo: list[EvalItem], run_row: _RowRunner, store: PredictionsFile, workers: int, tick) -> None:
    if workers == 1:
        for item in todo:
            store.append(run_row(item))
            tick()
        return
    # Keep at most `workers` rows in flight so an interrupt loses little work and memory stays flat.
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="thyme-eval") as pool:
        pending: set[Future] = set()
        queue = iter(todo)
        for item in queue:
            pending.add(pool.submit(run_row, item))
            if len(pending) < workers:
                continue
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                store.append(future.result())
                tick()
        for future in pending:
            store.append(future.result())
            tick()


def run_evaluation(
    data: str | Path,
    out_dir: str | Path,
    backend_for: BackendFor,
    config: EvalConfig | None = None,
    agent_config: AgentConfig | None = None,
    run_info: dict[str, Any] | None = None,
    sandbox: Any = None,
    judge: Judge | None = None,
    judge_cache: Path | None = None,
) -> EvalResult:
    """Evaluates a model on a benchmark file or folder and writes ``predictions.jsonl``, ``results.json`` and
    ``report.md`` to ``out_dir``.

    Args:
        data: a VLMEvalKit ``.tsv``, a ``.jsonl``, or a folder of them (see :mod:`thyme.evaluation.datasets`).
        out_dir: the output folder; an existing ``predictions.jsonl`` there is resumed.
        backend_for: returns the backend answering a row (see :data:`BackendFor`).
        config: mode, limit, workers; defaults to ``EvalConfig()``.
        agent_config: budget, sampling and image limits of the model; default: greedy with a single attempt
            (:data:`EVAL_AGENT_DEFAULTS`), because the agent's retries sample and a benchmark score must repeat.
        run_info: facts recorded in ``results.json`` (model name, backend); the dataset and mode are added.
        sandbox: a started ``thyme.sandbox.Sandbox`` to share (thyme mode); one is started and closed if None.
        judge: a judge model for the rows the rules cannot decide (:mod:`thyme.evaluation.judging`); rows of an
            earlier run left undecided are judged too.
        judge_cache: the verdict cache file; default ``out_dir/judge_cache.jsonl``.

    Returns:
        The metrics and predictions of every selected row, including those resumed from an earlier run.

    Raises:
        DatasetError: the dataset is malformed (checked before any model call).
        BackendError, SandboxError: infrastructure failures; finished rows stay in ``predictions.jsonl``.
    """
    config = config or EvalConfig()
    agent_config = agent_config or AgentConfig(**EVAL_AGENT_DEFAULTS)
    out = Path(out_dir)
    items = load_dataset(data)[: config.limit]
    out.mkdir(parents=True, exist_ok=True)
    store = PredictionsFile(out / PREDICTIONS_FILE)
    earlier = store.load()
    other_modes = sorted({p.mode for p in earlier.values()} - {config.mode})
    if other_modes:
        raise ConfigError(
            f"{store.path} holds {', '.join(other_modes)}-mode predictions; use a separate --out for each mode"
        )
    done = {index: p for index, p in earlier.items() if p.error is None}
    todo = [item for item in items if item.index not in done]
    logger.info("%d rows to answer, %d already in %s", len(todo), len(items) - len(todo), store.path)
    with _sandbox_context(sandbox, config, agent_config, bool(todo)) as live_sandbox:
        runner = _RowRunner(backend_for, config, agent_config, out, live_sandbox)
        with progress_bar(len(items), len(items) - len(todo), config.progress) as tick:
            _run_rows(todo, runner, store, config.workers, tick)
    recorded = store.load()
    judge_info = None
    if judge is not None:
        stage = JudgeStage(judge, judge_cache or out / JUDGE_CACHE_FILE)
        for decided in stage.decide({item.index: item for item in items}, [recorded[i.index] for i in items]):
            store.append(decided)  # the last record of an index wins on load
        recorded = store.load()
        judge_info = {"endpoint": judge.base_url, "model": judge.model, "questions_asked": stage.asked}
    predictions = [recorded[item.index] for item in items]
    metrics = compute_metrics(predictions)
    info = {
        "dataset": str(Path(data).resolve()),
        "mode": config.mode,
        "rows": len(items),
        "thyme_version": thyme.__version__,
        "finished_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        **(run_info or {}),
    }
    if judge_info is not None:
        info["judge"] = judge_info
    info["agent_config"] = {k: str(v) if isinstance(v, Path) else v for k, v in agent_config.__dict__.items()}
    write_results(out, metrics, info)
    write_report(out, predictions, metrics, info, examples=config.report_examples)
    return EvalResult(metrics, predictions, out, skipped=len(items) - len(todo))


def _sandbox_context(sandbox: Any, config: EvalConfig, agent_config: AgentConfig, needed: bool):
    if sandbox is not None or config.mode != "thyme" or not needed:
        return nullcontext(sandbox)
    from thyme.sandbox import Sandbox

    return Sandbox(timeout=agent_config.sandbox_timeout_s)
