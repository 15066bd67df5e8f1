"""``thyme eval``: score a model on a benchmark with and without tools; ``thyme bench synth``: make offline data."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from thyme.commands.options import (
    add_loop_arguments,
    add_model_arguments,
    agent_config_from_args,
    check_model_name,
    load_model_backend,
    with_model_pixel_limits,
)

# Rows in flight into one in-process vLLM engine when --workers is not given: enough to fill a batch.
VLLM_DEFAULT_WORKERS = 16


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Adds the ``eval`` and ``bench`` sub-commands."""
    _add_eval(commands)
    _add_bench(commands)


def _add_eval(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "eval",
        help="benchmark a model (V*, HR-Bench, MME-RealWorld, your own JSONL) with or without the tool loop",
        description=(
            "Runs every row of a VLMEvalKit TSV or a JSONL file (or a folder of them) through the Thyme agent "
            "(--mode thyme) or through the same model answering directly (--mode direct), scores the answers with "
            "VLMEvalKit-style rules and writes predictions.jsonl (with full trajectories), results.json and "
            "report.md to --out. Re-running with the same --out resumes: rows already answered are skipped."
        ),
    )
    parser.add_argument("--data", type=Path, required=True, metavar="FILE_OR_DIR", help=".tsv, .jsonl or a folder")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder (resumed if it exists)")
    add_model_arguments(parser, required=True, scripted_help='replay model text: JSON {"<row index>": [segments...]}')
    parser.add_argument("--mode", choices=("thyme", "direct"), default="thyme", help="tool loop or plain (thyme)")
    parser.add_argument("--limit", type=int, metavar="N", help="evaluate only the first N rows")
    parser.add_argument(
        "--workers",
        type=int,
        metavar="K",
        help=f"rows in parallel (--endpoint or --engine vllm; default 1, {VLLM_DEFAULT_WORKERS} with --engine vllm)",
    )
    add_loop_arguments(parser, max_attempts=1, max_attempts_help="attempts before the fallback (1: retries sample)")
    parser.add_argument(
        "--eval-image-quirk",
        action="store_true",
        help="keep the official eval's literal '<image>' after the vision block (parity with the paper's numbers)",
    )
    parser.add_argument("--report-examples", type=int, default=3, metavar="N", help="trajectories in report.md (3)")
    parser.add_argument(
        "--judge-endpoint",
        metavar="URL",
        help="OpenAI-compatible judge for answers the rules cannot read (key from $THYME_JUDGE_API_KEY)",
    )
    parser.add_argument("--judge-model", metavar="NAME", help="the judge's model name (needed with --judge-endpoint)")
    parser.add_argument(
        "--samples",
        type=int,
        default=1,
        metavar="K",
        help="K sampled runs (needs --sampling ats); results.json has the mean and spread over K (Avg@K)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(handler=run_eval)


def _add_bench(commands: argparse._SubParsersAction) -> None:
    bench = commands.add_parser("bench", help="benchmark data tools")
    actions = bench.add_subparsers(dest="bench_command", metavar="ACTION", required=True)
    synth = actions.add_parser(
        "synth",
        help="generate a V*-style high-resolution benchmark offline",
        description=(
            "Writes N large cluttered images with small coloured shapes, a word sign and a number tag, and one "
            "question each (colour, relative position, text, digits) with its answer and ground-truth boxes, as "
            "DIR/synth.jsonl (the format `thyme eval --data` reads). Deterministic for a given --seed."
        ),
    )
    synth.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder")
    synth.add_argument("--n", type=int, default=100, metavar="N", help="number of rows (100)")
    synth.add_argument("--size", type=int, default=4096, metavar="PX", help="image width in pixels (4096)")
    synth.add_argument("--seed", type=int, default=0, help="random seed (0)")
    synth.add_argument("--no-progress", action="store_true", help="no progress bar")
    synth.set_defaults(handler=run_synth)
    compare = actions.add_parser(
        "compare",
        help="accuracy of two `thyme eval` runs side by side, with the difference in points",
        description="Prints a markdown table: overall and per-category accuracy of BASE and NEW and NEW - BASE "
        "(e.g. BASE a --mode direct run, NEW the --mode thyme run of the same model and data).",
    )
    compare.add_argument("base", type=Path, metavar="BASE", help="--out folder of the baseline run")
    compare.add_argument("new", type=Path, metavar="NEW", help="--out folder of the run to compare")
    compare.set_defaults(handler=run_compare)


def _load_scripts(path: Path) -> tuple[dict[str, list[str]], list[str] | None]:
    """Reads an eval script: ``{"<row index>": [model text, ...]}`` per row, or ONE recording (a list of segments,
    ``{"segments": [...]}`` like ``thyme/data/examples/readme_17127.json``, or a saved trajectory) that every row
    replays. Returns (per-row scripts, the one recording or None)."""
    from thyme.backends.scripted import load_script
    from thyme.errors import ConfigError

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read script {path}: {exc}") from exc
    if isinstance(data, list) or (isinstance(data, dict) and "segments" in data):
        return {}, load_script(path)
    if not isinstance(data, dict):
        raise ConfigError(f'script {path} must be a JSON object {{"<row index>": ["model text", ...]}}')
    scripts = {}
    for index, value in data.items():
        segments = value.get("segments") if isinstance(value, dict) else value
        if not isinstance(segments, list) or not all(isinstance(s, str) for s in segments):
            raise ConfigError(
                f"script {path}: row {index!r} must map to a list of model-text strings (or give the whole file "
                'one recording, {"segments": [...]}, that every row replays)'
            )
        scripts[str(index)] = segments
    return scripts, None


def _backend_factory(args: argparse.Namespace) -> tuple[Any, Any]:
    """Returns (backend_for, shared backend to close or None)."""
    from thyme.backends import BACKENDS
    from thyme.errors import ConfigError

    if args.workers > 1 and args.model and args.engine == "transformers":
        raise ConfigError(
            "--workers > 1 needs --endpoint, --engine vllm (or --scripted): a transformers model answers one row "
            "at a time"
        )
    check_model_name(args)
    if args.scripted:
        scripts, recording = _load_scripts(args.scripted)
        if recording is not None:
            print(
                f"note: scripted replay: every row replays the one recording in {args.scripted} (no model runs)",
                file=sys.stderr,
            )
            return (lambda item: BACKENDS["scripted"](recording)), None

        def scripted_for(item: Any) -> Any:
            if item.index not in scripts:
                raise ConfigError(
                    f"script {args.scripted} has no entry for row {item.index!r}; add one or use --limit"
                )
            return BACKENDS["scripted"](scripts[item.index])

        return scripted_for, None
    if args.endpoint:
        backend = BACKENDS["openai"](args.endpoint, model=args.model_name)
    else:
        backend = load_model_backend(args)  # one backend shared by every row
    return (lambda item: backend), backend


def _judge(args: argparse.Namespace) -> Any:
    """The judge of ``--judge-endpoint`` / ``--judge-model``, or None."""
    from thyme.errors import ConfigError

    if bool(args.judge_endpoint) != bool(args.judge_model):
        raise ConfigError("--judge-endpoint and --judge-model go together: name the judge's server and its model")
    if not args.judge_endpoint:
        return None
    from thyme.judge import Judge, judge_api_key

    return Judge(args.judge_endpoint, args.judge_model, api_key=judge_api_key())


def run_eval(args: argparse.Namespace) -> int:
    """Runs the evaluation and prints the headline numbers and where the files are."""
    from thyme.evaluation.harness import EvalConfig, run_evaluation

    if args.workers is None:
        args.workers = VLLM_DEFAULT_WORKERS if args.model and args.engine == "vllm" else 1
    config = EvalConfig(
        mode=args.mode,
        limit=args.limit,
        workers=args.workers,
        report_examples=args.report_examples,
        progress=not args.no_progress,
    )
    agent_config = agent_config_from_args(args, eval_image_quirk=args.eval_image_quirk)
    judge = _judge(args)
    if args.samples != 1:
        from thyme.evaluation.sampling import check_samples, run_samples

        check_samples(args.samples, agent_config)
    backend_for, backend = _backend_factory(args)
    if args.model:
        agent_config = with_model_pixel_limits(agent_config, args, backend)
    model = args.model or args.endpoint or f"scripted:{args.scripted}"
    info = {"model": model, "backend": args.engine if args.model else "openai" if args.endpoint else "scripted"}
    try:
        if args.samples != 1:
            return _report_samples(
                run_samples(args.data, args.out, backend_for, args.samples, config, agent_config, info, judge)
            )
        result = run_evaluation(args.data, args.out, backend_for, config, agent_config, run_info=info, judge=judge)
    finally:
        if backend is not None:
            backend.close()
    m = result.metrics
    print(f"accuracy {100 * m.accuracy:.1f} % ({m.correct}/{m.total}), mode {args.mode}, {result.skipped} resumed")
    for name, score in m.categories.items():
        print(f"  {name}: {100 * score.accuracy:.1f} % ({score.correct}/{score.total})")
    print(
        f"code used in {100 * m.code_use_rate:.1f} % of answers, {m.avg_generation_calls:.2f} generation calls per "
        f"answer, sandbox error rate {100 * m.sandbox_error_rate:.1f} %"
    )
    if m.judged:
        print(f"the judge decided {m.judged} row(s) the rules could not read ({m.judged_correct} correct)")
    print(f"wrote {result.out_dir / 'results.json'}, predictions.jsonl and report.md")
    if m.failed:
        # Exit 1 so scripts notice that the scores cover rows that could not be answered.
        print(f"warning: {m.failed} row(s) failed (see 'error' in predictions.jsonl); they run again on resume",
              file=sys.stderr)  # fmt: skip
        return 1
    return 0


def _report_samples(result: Any) -> int:
    """Prints the Avg@k figures of a ``--samples`` run; exit 1 when a run left failed rows."""
    spread = result.accuracy
    k = len(result.runs)
    print(f"Avg@{k} accuracy {100 * spread.mean:.1f} % (std {100 * spread.std:.1f}, "
          f"min {100 * spread.min:.1f}, max {100 * spread.max:.1f}) over {k} sampled runs")  # fmt: skip
    for name, score in result.categories.items():
        print(f"  {name}: {100 * score.mean:.1f} % (std {100 * score.std:.1f})")
    judged = sum(run.metrics.judged for run in result.runs)
    if judged:
        print(f"the judge decided {judged} row(s) over the {k} runs")
    print(f"wrote {result.out_dir / 'results.json'} and one folder per run (sample_1 ... sample_{k})")
    failed = sum(run.metrics.failed for run in result.runs)
    if failed:
        print(f"warning: {failed} row(s) failed over the runs; they run again on resume", file=sys.stderr)
        return 1
    return 0


def run_synth(args: argparse.Namespace) -> int:
    """Generates the synthetic set and prints where it is."""
    from thyme.errors import ConfigError
    from thyme.evaluation.harness import progress_bar
    from thyme.evaluation.synth import generate_synth

    try:
        with progress_bar(args.n, enabled=not args.no_progress, desc="thyme bench synth", unit="img") as tick:
            path = generate_synth(args.out, n=args.n, size=args.size, seed=args.seed, progress=tick)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    print(f"wrote {args.n} rows to {path}")
    return 0


def run_compare(args: argparse.Namespace) -> int:
    """Prints the comparison table of two runs."""
    from thyme.evaluation.report import compare_runs

    print(compare_runs(args.base, args.new), end="")
    return 0
