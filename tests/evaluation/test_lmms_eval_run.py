"""lmms-eval's own evaluator runs our `thyme_agent` adapter on a tiny local task, in lmms-eval's own environment.

lmms-eval 0.7.3 cannot share the project's environment (it pins its own torchvision, datasets and filelock), so it
lives in a separate venv named by ``THYME_LMMS_EVAL_PYTHON`` (docs/eval.md says how to build it). The test runs
``python -m lmms_eval --model thyme_agent`` there as a subprocess, against a stand-in OpenAI-compatible model server
in this process that knows the right answers: a score of 1.0 means every document went through lmms-eval's task
loading, our adapter, the Thyme agent (loop and sandbox in the subprocess) and back into lmms-eval's metrics; the
server counts the images of each question, so the two-image document proves both images were sent.
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path

import pytest
from PIL import Image

import thyme

LMMS_PYTHON = os.environ.get("THYME_LMMS_EVAL_PYTHON")
README_IMAGE = Path(thyme.__file__).parent / "data" / "examples" / "17127.jpg"
ANSWERS = {"What is the plate number of the blue car?": "S QT 911", "Which image is plain blue?": "second"}

UTILS = textwrap.dedent(
    """
    from PIL import Image


    def doc_to_visual(doc):
        return [Image.open(path).convert("RGB") for path in doc["images"]]


    def doc_to_text(doc, lmms_eval_specific_kwargs=None):
        return doc["question"]


    def process_results(doc, results):
        return {"exact_match": float(results[0].strip().lower() == doc["answer"].lower())}
    """
)


def _task(folder: Path) -> None:
    Image.new("RGB", (64, 48), "blue").save(folder / "blue.png")
    rows = [
        {"images": [str(README_IMAGE)], "question": "What is the plate number of the blue car?", "answer": "S QT 911"},
        {"images": [str(README_IMAGE), str(folder / "blue.png")], "question": "Which image is plain blue?",
         "answer": "second"},
    ]  # fmt: skip
    (folder / "data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (folder / "utils.py").write_text(UTILS)
    (folder / "thyme_tiny_local.yaml").write_text(
        textwrap.dedent(
            f"""
            task: thyme_tiny_local
            dataset_path: json
            dataset_kwargs:
              data_files:
                test: {folder / "data.jsonl"}
            test_split: test
            output_type: generate_until
            doc_to_visual: !function utils.doc_to_visual
            doc_to_text: !function utils.doc_to_text
            doc_to_target: answer
            generation_kwargs:
              max_new_tokens: 16
            process_results: !function utils.process_results
            metric_list:
              - metric: exact_match
                aggregation: mean
                higher_is_better: true
            """
        )
    )


@pytest.mark.slow
@pytest.mark.skipif(not LMMS_PYTHON, reason="set THYME_LMMS_EVAL_PYTHON to a python with lmms-eval 0.7.3 and thyme")
def test_lmms_eval_scores_the_thyme_agent_adapter(tmp_path: Path) -> None:
    from fastapi import FastAPI

    from tests.fixtures.openai_server import serve

    images_per_question: dict[str, int] = {}
    app = FastAPI()

    @app.post("/v1/chat/completions")
    def chat(body: dict) -> dict:
        user = body["messages"][1]["content"]
        text = user[-1]["text"]
        question = next(q for q in ANSWERS if q in text)
        images_per_question[question] = sum(part["type"] == "image_url" for part in user)
        content = f"<think>Looked.</think>\n<answer>{ANSWERS[question]}</answer>"
        return {
            "id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }  # fmt: skip

    _task(tmp_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    with serve(app) as root:
        command = [
            LMMS_PYTHON, "-m", "lmms_eval", "--model", "thyme_agent",
            "--model_args", f"endpoint={root}/v1,model_name=stand-in",
            "--tasks", "thyme_tiny_local", "--include_path", str(tmp_path), "--batch_size", "1",
            "--output_path", str(tmp_path / "out"), "--log_samples",
        ]  # fmt: skip
        run = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    [results_file] = (tmp_path / "out").rglob("*_results.json")
    results = json.loads(results_file.read_text())["results"]["thyme_tiny_local"]
    assert results["exact_match,none"] == 1.0, run.stderr[-3000:]
    assert images_per_question == {"What is the plate number of the blue car?": 1, "Which image is plain blue?": 2}
