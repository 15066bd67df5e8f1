"""What a run leaves in its output folder besides ``predictions.jsonl``: ``results.json`` and ``report.md``.

``results.json`` is for machines (plotting, comparing a ``--mode thyme`` run with a ``--mode direct`` run);
``report.md`` is for a person: the scores, the tool statistics, and a few example trajectories rendered with their
code and the crops the sandbox returned, so one can see *how* the model used its tools, not only how often.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from thyme.errors import ConfigError, ProtocolError
from thyme.evaluation.metrics import CategoryScore, Metrics
from thyme.evaluation.predictions import Prediction
from thyme.trajectory import Answer, Code, Prose, SandboxOutput, Trajectory

logger = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
REPORT_FILE = "report.md"
DEFAULT_REPORT_EXAMPLES = 3
# Prose longer than this is cut in the report (the full text stays in predictions.jsonl).
_MAX_PROSE_CHARS = 1200


def write_results(out_dir: Path, metrics: Metrics, run_info: dict[str, Any]) -> Path:
    """Writes ``results.json``: ``run_info`` (dataset, model, mode, settings) and the metrics.

    Returns:
        The path written.
    """
    path = out_dir / RESULTS_FILE
    payload = {**run_info, "metrics": metrics.to_dict()}
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def _percent(value: float) -> str:
    return f"{100 * value:.1f}"


def _score_table(title: str, scores: dict[str, CategoryScore]) -> list[str]:
    lines = [f"| {title} | correct | total | accuracy (%) |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {s.correct} | {s.total} | {_percent(s.accuracy)} |" for name, s in scores.items()]
    return [*lines, ""]


def _summary(metrics: Metrics, run_info: dict[str, Any]) -> list[str]:
    average = metrics.avg_generated_tokens
    generated = "n/a (backend reports no token ids)" if average is None else f"{average:.1f}"
    lines = [
        f"# Thyme evaluation: {run_info.get('dataset', '?')}",
        "",
        f"Model `{run_info.get('model', '?')}`, mode `{run_info.get('mode', '?')}`, {metrics.total} questions.",
        "",
        f"- **Accuracy: {_percent(metrics.accuracy)} %** ({metrics.correct}/{metrics.total})",
    ]
    if metrics.macro_accuracy is not None:
        lines.append(f"- Mean of category accuracies: {_percent(metrics.macro_accuracy)} %")
    lines += [
        f"- Answers no rule could read (a judge might): {metrics.unmatched}; rows that failed: {metrics.failed}",
        f"- Rows decided by the judge model: {metrics.judged} ({metrics.judged_correct} of them correct)",
        f"- Used code: {_percent(metrics.code_use_rate)} % of answers; generation calls per answer: "
        f"{metrics.avg_generation_calls:.2f}; answered by the fallback prompt: {_percent(metrics.fallback_rate)} %",
        f"- Sandbox runs: {metrics.sandbox_runs}, of which {_percent(metrics.sandbox_error_rate)} % ended in an error",
        f"- Tokens per answer: {generated} generated, {metrics.avg_prompt_tokens:.1f} prompt",
        "",
    ]
    lines += _score_table("category", metrics.categories)
    if metrics.l2_categories:
        lines += _score_table("l2-category", metrics.l2_categories)
    return lines


def pick_examples(predictions: Sequence[Prediction], count: int) -> list[Prediction]:
    """Chooses up to ``count`` rows worth reading: code users first (right, then wrong), then the rest, in order."""
    ranked = sorted(predictions, key=lambda p: (p.code_blocks == 0, not p.correct, p.index))
    chosen: list[Prediction] = []
    for wanted in (True, False):  # one right and one wrong code user up front, when they exist
        chosen += [p for p in ranked if p.code_blocks and p.correct is wanted][:1]
    chosen += [p for p in ranked if p not in chosen]
    return chosen[:count]


def _link(path: str, out_dir: Path) -> str:
    return Path(os.path.relpath(path, out_dir)).as_posix()


def _render_trajectory(record: Prediction, out_dir: Path) -> list[str]:
    if not isinstance(record.trajectory, dict):
        return ["```text", str(record.trajectory or ""), "```"]
    try:
        parts = Trajectory.from_dict(record.trajectory).parts()
    except ProtocolError as exc:
        return [f"(trajectory not readable: {exc})"]
    lines: list[str] = []
    for part in parts:
        if isinstance(part, Prose) and part.text.strip():
            text = part.text.strip()
            text = text if len(text) <= _MAX_PROSE_CHARS else text[:_MAX_PROSE_CHARS] + " [...]"
            lines += ["> " + line for line in text.splitlines()] + [""]
        elif isinstance(part, Code):
            lines += ["```python", part.code, "```", ""]
        elif isinstance(part, SandboxOutput):
            if part.images:
                lines += [" ".join(f"![crop]({_link(p, out_dir)})" for p in part.images), ""]
            else:
                lines += ["Sandbox output:", "```text", part.shown_text, "```", ""]
        elif isinstance(part, Answer):
            lines += [f"**Answer:** {part.answer}", ""]
    return lines


def _example(record: Prediction, out_dir: Path) -> list[str]:
    verdict = "right" if record.correct else "wrong"
    lines = [
        f"### Row {record.index} ({record.category or 'no category'}, {verdict})",
        "",
        "```text",
        record.question,
        "```",
        "",
        f"Ground truth `{record.answer}`, prediction `{record.prediction}` (read as `{record.extracted}`); "
        f"{record.generation_calls} generation call(s), {record.code_blocks} code block(s).",
        "",
    ]
    if record.error:
        lines += [f"Error: {record.error}", ""]
    return lines + _render_trajectory(record, out_dir)


def write_report(
    out_dir: Path,
    predictions: Sequence[Prediction],
    metrics: Metrics,
    run_info: dict[str, Any],
    examples: int = DEFAULT_REPORT_EXAMPLES,
) -> Path:
    """Writes ``report.md``: summary, per-category table and ``examples`` rendered trajectories with their crops.

    Image links are relative to ``out_dir``, so the folder can be moved or zipped as a whole.

    Returns:
        The path written.
    """
    lines = _summary(metrics, run_info)
    chosen = pick_examples(predictions, examples)
    if chosen:
        lines += ["## Example trajectories", ""]
        for record in chosen:
            lines += _example(record, out_dir)
    path = out_dir / REPORT_FILE
    path.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    return path


def _load_results(run_dir: Path) -> dict[str, Any]:
    path = run_dir / RESULTS_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read {path} ({exc}): pass the --out folder of a finished `thyme eval` run") from exc
    if "metrics" not in data:
        hint = "compare one of its sample_<i> folders" if "samples" in data else "pass the --out folder of a run"
        raise ConfigError(f"{path} holds no per-run metrics (a --samples summary?): {hint}")
    return data


def _comparability_warnings(base: dict, new: dict, base_dir: Path, new_dir: Path) -> list[str]:
    """Lines that say when the two runs did not score the same rows (a 2-row run against a 200-row one)."""
    warnings = []
    b_total, n_total = base["metrics"].get("total"), new["metrics"].get("total")
    if b_total != n_total:
        warnings.append(
            f"> **warning**: the runs scored different numbers of rows ({base_dir.name}: {b_total}, {new_dir.name}: "
            f"{n_total}), so the difference is not a like-for-like comparison (finish or --limit both runs alike)."
        )
    if base.get("dataset") and new.get("dataset") and base["dataset"] != new["dataset"]:
        warnings.append(f"> **warning**: the runs used different data ({base['dataset']} and {new['dataset']}).")
    return [*warnings, ""] if warnings else []


def compare_runs(base_dir: Path, new_dir: Path) -> str:
    """A markdown table of accuracy per category and overall for two runs, with the difference in points.

    This is how a tool-use gain is reported: ``--mode direct`` as the base, ``--mode thyme`` as the new run, both
    from the same harness. Categories present in only one run show ``-`` for the other; runs over different rows
    or data get a warning above the table.

    Raises:
        ConfigError: a folder has no readable ``results.json``.
    """
    base, new = _load_results(base_dir), _load_results(new_dir)
    rows = [("overall", base["metrics"]["accuracy"], new["metrics"]["accuracy"])]
    names = sorted(set(base["metrics"]["categories"]) | set(new["metrics"]["categories"]))
    for name in names:
        b, n = base["metrics"]["categories"].get(name), new["metrics"]["categories"].get(name)
        rows.append((name, b["accuracy"] if b else None, n["accuracy"] if n else None))
    lines = [
        f"| accuracy (%) | {base.get('mode')} ({base_dir.name}) | {new.get('mode')} ({new_dir.name}) | Δ |",
        "|---|---:|---:|---:|",
    ]
    for name, b, n in rows:
        delta = f"{100 * (n - b):+.1f}" if b is not None and n is not None else "-"
        lines.append(
            f"| {name} | {_percent(b) if b is not None else '-'} | {_percent(n) if n is not None else '-'} | {delta} |"
        )
    lines = _comparability_warnings(base, new, base_dir, new_dir) + lines
    tools = new["metrics"]
    lines += ["", f"{new_dir.name}: code used in {_percent(tools['code_use_rate'])} % of answers, "
              f"{tools['avg_generation_calls']:.2f} generation calls per answer."]  # fmt: skip
    return "\n".join(lines) + "\n"
