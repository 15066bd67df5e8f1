"""One record per answered question, appended to ``predictions.jsonl`` as soon as it exists.

Appending line by line is what makes a run resumable: after a crash or Ctrl-C the file holds every finished row, and
the next run skips their indices. A line cut short by a crash is ignored with a warning (that row runs again).
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

PREDICTIONS_FILE = "predictions.jsonl"


@dataclass
class Prediction:
    """What the harness records for one benchmark row.

    Args:
        index: the row's index in the dataset.
        mode: ``"thyme"`` (tool loop) or ``"direct"`` (one plain generation).
        question_type: ``"mcq"``, ``"yes_no"`` or ``"vqa"``.
        category: the row's category, or None.
        l2_category: the row's second-level category, or None.
        question: the formatted question text the model saw (before the Thyme user template).
        answer: the ground truth.
        prediction: the model's answer text (inside ``<answer>``), or None when it gave none.
        extracted: what the matcher (or the judge) read from it (letter, yes/no, normalised text), or None.
        correct: whether it matched the ground truth.
        judged: whether a judge model decided ``extracted``/``correct`` because the rules could not
            (see :mod:`thyme.evaluation.judging`).
        judge_verdict: the judge's reply value (an option letter or ``Z``, ``yes``/``no``/``unknown``, ``1``/``0``).
        generation_calls: how many times the model generated.
        code_blocks: how many code blocks the sandbox ran.
        sandbox_errors: how many of those ended in an error shown to the model.
        generated_tokens: new tokens over all generation calls; None when the backend does not report them.
        prompt_tokens: prompt tokens processed over all calls.
        images: sandbox images (crops) in the order they were produced.
        stop_reason: how the final attempt ended (``answer``, ``eos``, ``budget``...; see :mod:`thyme.loop`), or None
            in direct mode.
        used_fallback: whether the answer came from the plain fallback prompt after the tool-loop attempts failed.
        trajectory: the full trajectory as a JSON object (see :mod:`thyme.trajectory`), or the raw text in
            direct mode.
        error: why the row could not be answered (a bad image, a protocol failure), or None.
        elapsed_s: wall time of the row in seconds.
    """

    index: str
    mode: str
    question_type: str
    category: str | None
    l2_category: str | None
    question: str
    answer: str
    prediction: str | None
    extracted: str | None
    correct: bool
    generation_calls: int = 0
    code_blocks: int = 0
    sandbox_errors: int = 0
    generated_tokens: int | None = 0
    prompt_tokens: int = 0
    images: list[str] = field(default_factory=list)
    stop_reason: str | None = None
    used_fallback: bool = False
    trajectory: Any = None
    error: str | None = None
    elapsed_s: float = 0.0
    judged: bool = False
    judge_verdict: str | None = None

    def to_json(self) -> str:
        """One line of ``predictions.jsonl``."""
        return json.dumps(asdict(self), ensure_ascii=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Prediction:
        """Reads a record back; unknown keys (from a newer version) are ignored."""
        known = {name: data[name] for name in cls.__dataclass_fields__ if name in data}
        return cls(**known)


class PredictionsFile:
    """Appends predictions to a JSONL file from several worker threads, one whole line at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def load(self) -> dict[str, Prediction]:
        """Returns the predictions already on disk by index (the last one wins if an index repeats)."""
        if not self.path.exists():
            return {}
        done: dict[str, Prediction] = {}
        with self.path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = Prediction.from_dict(json.loads(line))
                except (json.JSONDecodeError, TypeError) as exc:
                    logger.warning(
                        "%s:%d is not a complete prediction (%s); that row will run again", self.path, number, exc
                    )
                    continue
                done[record.index] = record
        return done

    def append(self, prediction: Prediction) -> None:
        """Writes one record and flushes it, so an interrupted run loses at most the rows in flight."""
        line = prediction.to_json() + "\n"
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a+b") as handle:
                # A crash can leave a half-written last line; start on a fresh line so this record stays whole.
                if handle.tell() > 0:
                    handle.seek(-1, 2)
                    if handle.read(1) != b"\n":
                        handle.write(b"\n")
                handle.write(line.encode("utf-8"))
                handle.flush()
