"""`--workers` with the OpenAI-compatible backend: rows really run concurrently over HTTP, scores are unchanged."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from tests.fixtures.openai_server import serve
from thyme import protocol
from thyme.backends.openai_compat import OpenAIBackend
from thyme.evaluation.datasets import load_dataset
from thyme.evaluation.harness import EvalConfig, run_evaluation
from thyme.evaluation.synth import generate_synth

WAIT_FOR_OVERLAP_S = 20.0  # generous: only reached if requests never overlap (the failure this test catches)


def _answering_app(answers: dict[str, str], state: dict):
    """Answers each question with its known answer; a request waits until another one is in flight."""
    from fastapi import FastAPI

    app = FastAPI()
    lock = threading.Lock()
    overlap = threading.Event()

    @app.post("/v1/chat/completions")
    def chat(body: dict) -> dict:  # sync: FastAPI runs it in a thread pool, so requests can overlap
        with lock:
            state["in_flight"] += 1
            state["max_in_flight"] = max(state["max_in_flight"], state["in_flight"])
            if state["in_flight"] >= 2:
                overlap.set()
        overlap.wait(WAIT_FOR_OVERLAP_S)
        text = "".join(part.get("text", "") for part in body["messages"][-1]["content"])
        answer = next(a for q, a in answers.items() if q in text)
        with lock:
            state["in_flight"] -= 1
        # vLLM's wire behaviour: a requested stop string is dropped from the text and named in stop_reason.
        stopped = protocol.ANSWER_CLOSE in (body.get("stop") or [])
        content = f"<think>Easy.</think>\n<answer>{answer}" + ("" if stopped else protocol.ANSWER_CLOSE)
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": content},
            "finish_reason": "stop",
            "stop_reason": protocol.ANSWER_CLOSE if stopped else None,
        }
        usage = {"prompt_tokens": 50, "completion_tokens": 6, "total_tokens": 56}
        return {
            "id": "c",
            "object": "chat.completion",
            "created": 0,
            "model": "m",
            "choices": [choice],
            "usage": usage,
        }

    return app


@pytest.mark.parametrize("mode", ["thyme", "direct"])
def test_workers_overlap_requests_to_an_openai_compatible_server(tmp_path: Path, mode: str) -> None:
    data = generate_synth(tmp_path / "set", n=6, size=256, seed=5)
    items = load_dataset(data)
    answers = {item.question: (item.answer if n != 0 else "nonsense") for n, item in enumerate(items)}
    state = {"in_flight": 0, "max_in_flight": 0}
    with serve(_answering_app(answers, state)) as root:
        backend = OpenAIBackend(f"{root}/v1", model="m")
        config = EvalConfig(mode=mode, workers=3, progress=False)
        result = run_evaluation(data, tmp_path / "out", lambda item: backend, config)
        backend.close()
    assert state["max_in_flight"] >= 2
    assert (result.metrics.correct, result.metrics.total) == (5, 6)
    assert [p.index for p in result.predictions] == [item.index for item in items]
    assert result.predictions[1].prompt_tokens == 50 and result.predictions[1].generated_tokens is None
