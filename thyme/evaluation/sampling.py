"""``thyme eval --samples k``: k sampled runs of one benchmark, reported as the mean and spread over k (Avg@k).

A greedy score hides how much a sampled policy varies; Mini-o3 and other agentic-vision papers report Avg@k, the
accuracy averaged over k sampled runs. Each run is an ordinary resumable evaluation in ``OUT/sample_<i>/`` (its own
predictions, results and report), seeded ``seed + i - 1`` when a seed is given; the top-level ``results.json`` holds
the mean, the sample standard deviation, the range and every run's accuracy, overall and per category. The k runs
share one judge cache, so an answer text that recurs across runs is judged once.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from thyme.config import AgentConfig
from thyme.errors import ConfigError
from thyme.evaluation.harness import BackendFor, EvalConfig, EvalResult, run_evaluation
from thyme.evaluation.judging import JUDGE_CACHE_FILE
from thyme.evaluation.report import RESULTS_FILE
from thyme.judge import Judge

SAMPLE_DIR = "sample_{}"


@dataclass(frozen=True)
class Spread:
    """Mean and spread of one accuracy over the k runs (fractions in [0, 1]); ``std`` is the sample standard
    deviation (0 for k = 1)."""

    mean: float
    std: float
    min: float
    max: float
    values: tuple[float, ...]

    @classmethod
    def of(cls, values: list[float]) -> Spread:
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return cls(statistics.fmean(values), std, min(values), max(values), tuple(values))

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "std": self.std, "min": self.min, "max": self.max, "per_sample": list(self.values)}


@dataclass
class SampledResult:
    """What :func:`run_samples` returns: every run's result and the Avg@k figures."""

    runs: list[EvalResult]
    accuracy: Spread
    categories: dict[str, Spread]
    out_dir: Path


def check_samples(samples: int, agent_config: AgentConfig) -> None:
    """Refuses settings under which k runs would not be k samples (before any model is loaded).

    Raises:
        ConfigError: ``samples`` < 1, or decoding is greedy (k greedy runs would repeat one answer k times).
    """
    if samples < 1:
        raise ConfigError(f"samples ({samples}) must be at least 1")
    if agent_config.sampling != "ats":
        raise ConfigError(
            "--samples needs sampled decoding: add --sampling ats (k greedy runs would give the same answers k times)"
        )


def run_samples(
    data: str | Path,
    out_dir: str | Path,
    backend_for: BackendFor,
    samples: int,
    config: EvalConfig | None = None,
    agent_config: AgentConfig | None = None,
    run_info: dict[str, Any] | None = None,
    judge: Judge | None = None,
) -> SampledResult:
    """Runs ``samples`` sampled evaluations into ``out_dir/sample_<i>`` and writes the Avg@k ``results.json``.

    Raises:
        ConfigError: ``samples`` < 1, or decoding is greedy (k greedy runs would repeat one answer k times).
    """
    agent_config = agent_config or AgentConfig(max_attempts=1)
    check_samples(samples, agent_config)
    out = Path(out_dir)
    runs = []
    for number in range(1, samples + 1):
        seed = None if agent_config.seed is None else agent_config.seed + number - 1
        runs.append(
            run_evaluation(
                data,
                out / SAMPLE_DIR.format(number),
                backend_for,
                config,
                dataclasses.replace(agent_config, seed=seed),
                run_info={**(run_info or {}), "sample": number, "samples": samples},
                judge=judge,
                judge_cache=out / JUDGE_CACHE_FILE,
            )
        )
    accuracy = Spread.of([run.metrics.accuracy for run in runs])
    names = sorted({name for run in runs for name in run.metrics.categories})
    categories = {
        name: Spread.of([run.metrics.categories[name].accuracy if name in run.metrics.categories else 0.0
                         for run in runs])
        for name in names
    }  # fmt: skip
    payload = {
        **(run_info or {}),
        "dataset": str(Path(data).resolve()),
        "samples": samples,
        "rows": runs[0].metrics.total,
        "accuracy": accuracy.to_dict(),
        "categories": {name: spread.to_dict() for name, spread in categories.items()},
        "judged_rows": [run.metrics.judged for run in runs],
        "runs": [SAMPLE_DIR.format(number) for number in range(1, samples + 1)],
    }
    (out / RESULTS_FILE).write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return SampledResult(runs, accuracy, categories, out)


__all__ = ["SampledResult", "Spread", "check_samples", "run_samples"]
