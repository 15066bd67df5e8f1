"""Plumbing only: the harness drives the real transformers backend (tiny random Qwen2.5-VL) in both modes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from thyme.config import AgentConfig
from thyme.evaluation.harness import EvalConfig, run_evaluation
from thyme.evaluation.synth import generate_synth

SMALL_IMAGES = {"min_pixels": 3136, "max_pixels": 4 * 3136}  # a handful of vision tokens per image


@pytest.fixture(scope="module")
def tiny_backend(tiny_model_dir: Path):
    from thyme.backends.local import TransformersBackend

    backend = TransformersBackend.from_pretrained(tiny_model_dir, device="cpu")
    yield backend
    backend.close()


@pytest.mark.parametrize("mode", ["thyme", "direct"])
def test_tiny_model_runs_through_the_harness(tmp_path: Path, tiny_backend, mode: str) -> None:
    data = generate_synth(tmp_path / "set", n=2, size=256, seed=0)
    config = AgentConfig(max_new_tokens=8, max_generation_calls=2, max_attempts=1, use_fallback=True, **SMALL_IMAGES)
    result = run_evaluation(
        data, tmp_path / "out", lambda item: tiny_backend, EvalConfig(mode=mode, progress=False), config
    )
    assert result.metrics.total == 2 and result.metrics.failed == 0
    for record in result.predictions:
        # Every call produced 1..8 real token ids and processed a prompt with the image in it.
        assert 1 <= record.generation_calls <= 3  # two calls of the attempt, then the fallback
        assert 1 <= record.generated_tokens <= 8 * record.generation_calls
        if mode == "thyme":  # a random model never writes an answer in 8 tokens: the fallback prompt is asked
            assert record.used_fallback and record.trajectory["metadata"]["fallback"]
        assert record.prompt_tokens > 0
        generations = [s["generation"] for s in record.trajectory["segments"] if s["type"] == "model_text"]
        assert all(g["token_ids"] for g in generations)
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["mode"] == mode and saved["metrics"]["avg_generated_tokens"] > 0
    assert saved["metrics"]["fallback_rate"] == (1.0 if mode == "thyme" else 0.0)
