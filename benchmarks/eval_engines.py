"""Eval rows per second through the in-process vLLM engine against the transformers engine: same model, same rows.

Both engines answer the same synthetic ``thyme bench synth`` rows with the Thyme loop (greedy, real sandbox), the
tiny random head_dim-64 model (``thyme tiny-model --head-dim 64``, float32 in both) unless ``--model`` names another.
transformers answers one row at a time (its only mode); vLLM gets ``--workers`` rows in flight into one engine.
A random model rarely writes code or an answer, so each row is its generation calls up to ``--max-new-tokens`` each
plus the fallback prompt: the figure measures generation throughput through the harness, not the sandbox. Engine
start-up is outside the timed part. Needs vLLM (the README's vLLM venv):

    .venv-vllm/bin/python benchmarks/eval_engines.py                 # 16 rows, 64 tokens per call, 16 workers
    .venv-vllm/bin/python benchmarks/eval_engines.py --rows 32 --max-new-tokens 128

Prints rows/s of each engine and ``ratio=R`` (vLLM rows/s over transformers rows/s).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def _rows_per_second(data: Path, out: Path, backend, workers: int, agent_config, sandbox) -> tuple[float, int]:
    from thyme.evaluation.harness import EvalConfig, run_evaluation

    config = EvalConfig(mode="thyme", workers=workers, progress=False, report_examples=0)
    started = time.perf_counter()
    result = run_evaluation(data, out, lambda item: backend, config, agent_config, sandbox=sandbox)
    wall = time.perf_counter() - started
    assert result.metrics.failed == 0, "a row failed: see predictions.jsonl"
    return result.metrics.total / wall, sum(p.generated_tokens for p in result.predictions)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="checkpoint directory (default: a fresh tiny head_dim-64 model)")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--workers", type=int, default=16, help="rows in flight into the vLLM engine")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--max-generation-calls", type=int, default=2)
    args = parser.parse_args()

    from thyme.backends.local import TransformersBackend
    from thyme.backends.vllm_engine import VLLMBackend
    from thyme.config import AgentConfig
    from thyme.evaluation.synth import generate_synth
    from thyme.sandbox import Sandbox
    from thyme.tiny import build_tiny_model

    with tempfile.TemporaryDirectory() as tmp, Sandbox(timeout=20) as sandbox:
        model = args.model or build_tiny_model(Path(tmp) / "tiny", head_dim=64)
        data = generate_synth(Path(tmp) / "set", n=args.rows, size=512)
        agent_config = AgentConfig(
            max_new_tokens=args.max_new_tokens,
            max_generation_calls=args.max_generation_calls,
            max_attempts=1,
            min_pixels=3136,
            max_pixels=16 * 3136,
        )
        local = TransformersBackend.from_pretrained(model, device="cpu", dtype="float32")
        hf_rate, hf_tokens = _rows_per_second(data, Path(tmp) / "hf", local, 1, agent_config, sandbox)
        local.close()
        engine = VLLMBackend.from_pretrained(model, dtype="float32", max_model_len=4096)
        try:
            vllm_rate, vllm_tokens = _rows_per_second(
                data, Path(tmp) / "vllm", engine, args.workers, agent_config, sandbox
            )
        finally:
            engine.close()
    print(f"rows={args.rows} max_new_tokens={args.max_new_tokens} calls<={args.max_generation_calls}")
    print(f"transformers (1 row at a time): {hf_rate:.2f} rows/s ({hf_tokens} tokens)")
    print(f"vllm ({args.workers} rows in flight): {vllm_rate:.2f} rows/s ({vllm_tokens} tokens)")
    print(f"ratio={vllm_rate / hf_rate:.2f}")


if __name__ == "__main__":
    main()
