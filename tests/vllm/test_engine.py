"""The in-process vLLM engine (``--engine vllm``) on the tiny model: requests carry the images, sampling and stops.

The model is random, so the tests assert plumbing: prompt tokens with every image counted, stop strings and
finish reasons, the greedy tokens of the transformers engine, concurrent callers, errors, and `thyme answer` /
`thyme eval` running end to end on the engine.
"""

from __future__ import annotations

import json
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.vllm.conftest import chat, expected_prompt_tokens
from thyme.backends.base import FINISH_EOS, FINISH_LENGTH, FINISH_STOP, SamplingParams
from thyme.errors import BackendError

GREEDY = SamplingParams(max_new_tokens=12)


def test_every_image_reaches_the_engine_including_the_sandbox_image(vllm_engine, images) -> None:
    nonce = uuid.uuid4().hex
    with_image, without = chat(images, nonce=nonce), chat(images, sandbox_image=False, nonce=nonce)
    processor = vllm_engine.processor
    # The sandbox image (112x112 px) is 16 image tokens plus vision start/end in the continued assistant message
    # (the text around it may split into one token more or less without it).
    assert expected_prompt_tokens(processor, with_image) - expected_prompt_tokens(processor, without) >= 16 + 1
    generation = vllm_engine.generate(with_image, stop=[], sampling=GREEDY)
    # A fresh system-prompt nonce: nothing of this prompt is in the prefix cache, so every token is computed.
    without = chat(images, sandbox_image=False, nonce=uuid.uuid4().hex)
    plain = vllm_engine.generate(without, stop=[], sampling=GREEDY)
    assert generation.prompt_tokens == expected_prompt_tokens(processor, with_image)
    assert plain.prompt_tokens == expected_prompt_tokens(processor, without)
    assert generation.finish_reason == FINISH_LENGTH and len(generation.token_ids) == 12


def test_greedy_tokens_equal_the_transformers_engine(vllm_engine, vllm_model_dir: Path, images) -> None:
    from thyme.backends.local import TransformersBackend

    # The checkpoint asks for repetition penalty 10 and top-k 1: both engines must ignore it for greedy 1.0.
    local = TransformersBackend.from_pretrained(vllm_model_dir, device="cpu", dtype="float32")
    try:
        expected = local.generate(chat(images), stop=[], sampling=GREEDY)
    finally:
        local.close()
    generation = vllm_engine.generate(chat(images), stop=[], sampling=GREEDY)
    assert generation.token_ids == expected.token_ids
    assert generation.text == expected.text


def test_stop_strings_end_the_text_and_set_the_finish_reason(vllm_engine, images) -> None:
    full = vllm_engine.generate(chat(images), stop=[], sampling=GREEDY).text
    stop = full[1:3]  # the random model repeats itself: the stop's FIRST occurrence ends the text
    generation = vllm_engine.generate(chat(images), stop=["never-produced", stop], sampling=GREEDY)
    assert generation.finish_reason == FINISH_STOP
    assert generation.text == full[: full.index(stop) + len(stop)]


def test_concurrent_callers_each_get_their_own_result(vllm_engine, images) -> None:
    short = SamplingParams(max_new_tokens=3)
    sequential = [vllm_engine.generate(chat(images), stop=[], sampling=sampling) for sampling in (GREEDY, short)]
    with ThreadPoolExecutor(8) as pool:
        results = list(
            pool.map(lambda i: vllm_engine.generate(chat(images), stop=[], sampling=(GREEDY, short)[i % 2]), range(8))
        )
    for index, result in enumerate(results):
        assert result.token_ids == sequential[index % 2].token_ids


def test_a_refused_request_fails_alone(vllm_engine, images) -> None:
    too_long = chat(images)
    too_long[1]["content"][1]["text"] = " word" * 3000  # beyond max_model_len 2048
    with pytest.raises(BackendError, match="vLLM refused the request: .*(longer|maximum)"):
        vllm_engine.generate(too_long, stop=[], sampling=GREEDY)
    assert len(vllm_engine.generate(chat(images), stop=[], sampling=GREEDY).token_ids) == 12


def test_finish_reasons_map_from_vllm_outputs() -> None:
    from thyme.backends.vllm_engine import _to_generation

    def output(finish_reason, stop_reason):
        completion = SimpleNamespace(
            text="ab</code>", token_ids=[1, 2], finish_reason=finish_reason, stop_reason=stop_reason
        )
        return SimpleNamespace(outputs=[completion], prompt_token_ids=[0] * 10, num_cached_tokens=4)

    assert _to_generation(output("stop", "</code>"), ["</code>"]).finish_reason == FINISH_STOP
    assert _to_generation(output("stop", None), ["</code>"]).finish_reason == FINISH_EOS  # the model's end token
    assert _to_generation(output("stop", 2), ["</code>"]).finish_reason == FINISH_EOS  # a stop token id
    assert _to_generation(output("length", None), ["</code>"]).finish_reason == FINISH_LENGTH
    assert _to_generation(output("stop", None), []).prompt_tokens == 6  # prefix-cache hits are not prompt work


class SharedEngine:
    """Stands in for a fresh engine in CLI runs: the session's engine (one start per session), left open on close;
    it records the calls, their threads and what the engine returned."""

    def __init__(self, engine) -> None:
        self.engine, self.calls, self.lock = engine, [], threading.Lock()

    def generate(self, messages, *, stop, sampling):
        generation = self.engine.generate(messages, stop=stop, sampling=sampling)
        with self.lock:
            self.calls.append((threading.current_thread().name, messages, generation))
        return generation

    def close(self) -> None:
        pass


@pytest.fixture
def shared_engine(vllm_engine, monkeypatch: pytest.MonkeyPatch):
    from thyme.backends import vllm_engine as module

    shared = SharedEngine(vllm_engine)
    shared.loaded = []

    def from_pretrained(id_or_path, **kwargs):
        shared.loaded.append((str(id_or_path), kwargs))
        return shared

    monkeypatch.setattr(module.VLLMBackend, "from_pretrained", staticmethod(from_pretrained))
    return shared


def test_thyme_answer_runs_on_the_vllm_engine(shared_engine, vllm_model_dir: Path, images, capsys) -> None:
    from thyme.cli import main

    argv = ["answer", images[0], "What is it?", "--model", str(vllm_model_dir), "--engine", "vllm", "--json"]
    assert main([*argv, "--max-new-tokens", "8", "--max-generation-calls", "2", "--max-attempts", "1"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert shared_engine.loaded == [(str(vllm_model_dir), {"dtype": "auto"})]
    # The random model never answers: its calls ran on the engine, then the fallback prompt (one more call).
    assert summary["generation_calls"] == len(shared_engine.calls) >= 2
    for _, messages, generation in shared_engine.calls:
        assert 1 <= len(generation.token_ids) <= 8
        assert generation.prompt_tokens > 0  # the input image's tokens at least (prefix-cache hits excluded)
        assert any(item.get("type") == "image" for message in messages for item in message.get("content", []))


def test_thyme_eval_runs_rows_concurrently_into_the_engine(shared_engine, vllm_model_dir: Path, tmp_path) -> None:
    from thyme.cli import main
    from thyme.evaluation.synth import generate_synth

    data = generate_synth(tmp_path / "set", n=4, size=256, seed=0)
    argv = ["eval", "--data", str(data), "--out", str(tmp_path / "out"), "--model", str(vllm_model_dir)]
    argv += ["--engine", "vllm", "--max-new-tokens", "8", "--max-generation-calls", "2", "--no-progress"]
    assert main([*argv, "--min-pixels", "3136", "--max-pixels", str(4 * 3136)]) == 0
    rows = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and not any(row.get("error") for row in rows)
    assert sum(row["generation_calls"] for row in rows) == len(shared_engine.calls)
    # Rows ran in the harness's worker threads (16 by default with --engine vllm), not one after another.
    assert {name.split("_")[0] for name, _, _ in shared_engine.calls} == {"thyme-eval"}
    assert json.loads((tmp_path / "out" / "results.json").read_text())["backend"] == "vllm"


def test_thyme_demo_loads_the_vllm_engine(shared_engine, vllm_model_dir: Path) -> None:
    import argparse

    from thyme.ui import cli as demo_cli

    parser = argparse.ArgumentParser(prog="thyme")
    demo_cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(["demo", "--model", str(vllm_model_dir), "--engine", "vllm"])
    assert demo_cli._build_backend(args) is shared_engine
    assert shared_engine.loaded == [(str(vllm_model_dir), {"dtype": "auto"})]  # no transformers-only --device
    assert demo_cli._description(args, Path("unused.json")) == f"Model `{vllm_model_dir}` (vllm)."
