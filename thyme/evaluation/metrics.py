"""Scores of a run: accuracy overall and per category, and how the model used its tools.

Accuracy is what the paper's tables report (reference section 5; HR-Bench and V* report per-category accuracy and
an overall figure). The tool statistics are what the paper does not report and users ask about (issue #18: does the
model write code at all?): the share of answers that used code, generation calls per answer, the share of sandbox
runs that ended in an error, and tokens per answer.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from thyme.evaluation.predictions import Prediction


@dataclass(frozen=True)
class CategoryScore:
    """Accuracy within one category (fractions in [0, 1])."""

    correct: int
    total: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0


@dataclass
class Metrics:
    """Aggregate scores of a set of predictions.

    Args:
        total: rows scored.
        correct: rows answered correctly.
        accuracy: ``correct / total`` (micro average, as VLMEvalKit's "Overall").
        macro_accuracy: mean of the per-category accuracies (equal weight per category), or None without categories.
        categories: category -> score; rows without a category are under ``"(none)"``.
        l2_categories: second-level category -> score (MME-RealWorld), empty when the data has none.
        question_types: ``mcq`` / ``yes_no`` / ``vqa`` -> score.
        unmatched: rows whose answer neither a matching rule nor the judge could read.
        judged: rows a judge model decided because the rules could not (``thyme eval --judge-endpoint``).
        judged_correct: of those, the rows the judge's verdict made correct.
        failed: rows that could not be answered at all (``Prediction.error`` set).
        code_use_rate: share of rows whose trajectory ran at least one code block.
        fallback_rate: share of rows answered by the plain fallback prompt (no tools) after the attempts failed.
        avg_generation_calls: generation calls per row.
        sandbox_runs: code blocks run in total.
        sandbox_error_rate: share of sandbox runs that ended in an error (0 when none ran).
        avg_generated_tokens: generated tokens per row, over rows whose backend reported them (None: none did).
        avg_prompt_tokens: prompt tokens processed per row.
    """

    total: int
    correct: int
    accuracy: float
    macro_accuracy: float | None
    categories: dict[str, CategoryScore] = field(default_factory=dict)
    l2_categories: dict[str, CategoryScore] = field(default_factory=dict)
    question_types: dict[str, CategoryScore] = field(default_factory=dict)
    unmatched: int = 0
    judged: int = 0
    judged_correct: int = 0
    failed: int = 0
    code_use_rate: float = 0.0
    fallback_rate: float = 0.0
    avg_generation_calls: float = 0.0
    sandbox_runs: int = 0
    sandbox_error_rate: float = 0.0
    avg_generated_tokens: float | None = None
    avg_prompt_tokens: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; each category carries its ``accuracy`` next to its counts."""
        data = asdict(self)
        for key in ("categories", "l2_categories", "question_types"):
            data[key] = {
                name: {"correct": s.correct, "total": s.total, "accuracy": s.accuracy}
                for name, s in getattr(self, key).items()
            }
        return data


_NO_CATEGORY = "(none)"


def _group(predictions: list[Prediction], key: str) -> dict[str, CategoryScore]:
    counts: dict[str, list[int]] = {}
    for record in predictions:
        name = getattr(record, key) or _NO_CATEGORY
        pair = counts.setdefault(name, [0, 0])
        pair[0] += int(record.correct)
        pair[1] += 1
    return {name: CategoryScore(correct=c, total=t) for name, (c, t) in sorted(counts.items())}


def _known_mean(values: list[int | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def compute_metrics(predictions: Iterable[Prediction]) -> Metrics:
    """Aggregates predictions into :class:`Metrics`.

    Example:
        >>> from thyme.evaluation.predictions import Prediction
        >>> rows = [Prediction("1", "thyme", "mcq", "FSP", None, "q", "A", "A", "A", True, code_blocks=1),
        ...         Prediction("2", "thyme", "mcq", "FCP", None, "q", "B", "C", "C", False)]
        >>> m = compute_metrics(rows)
        >>> (m.accuracy, m.categories["FSP"].accuracy, m.code_use_rate)
        (0.5, 1.0, 0.5)
    """
    rows = list(predictions)
    n = len(rows)
    correct = sum(r.correct for r in rows)
    categories = _group(rows, "category")
    has_categories = any(r.category for r in rows)
    sandbox_runs = sum(r.code_blocks for r in rows)

    def mean(values: Iterable[float]) -> float:
        return sum(values) / n if n else 0.0

    return Metrics(
        total=n,
        correct=correct,
        accuracy=correct / n if n else 0.0,
        macro_accuracy=(sum(s.accuracy for s in categories.values()) / len(categories)) if has_categories else None,
        categories=categories,
        l2_categories=_group(rows, "l2_category") if any(r.l2_category for r in rows) else {},
        question_types=_group(rows, "question_type"),
        unmatched=sum(1 for r in rows if r.prediction is not None and r.extracted is None and not r.judged),
        judged=sum(1 for r in rows if r.judged),
        judged_correct=sum(1 for r in rows if r.judged and r.correct),
        failed=sum(1 for r in rows if r.error is not None),
        code_use_rate=mean(1.0 if r.code_blocks else 0.0 for r in rows),
        fallback_rate=mean(1.0 if r.used_fallback else 0.0 for r in rows),
        avg_generation_calls=mean(r.generation_calls for r in rows),
        sandbox_runs=sandbox_runs,
        sandbox_error_rate=sum(r.sandbox_errors for r in rows) / sandbox_runs if sandbox_runs else 0.0,
        avg_generated_tokens=_known_mean([r.generated_tokens for r in rows]),
        avg_prompt_tokens=mean(r.prompt_tokens for r in rows),
    )
