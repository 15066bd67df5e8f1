"""A dry run looks like one: the tiny model ends in seconds with a summary of the loop, a replay says it is one,
and new tokens never run past the model's context window."""

from __future__ import annotations

import io
import json
from pathlib import Path

from PIL import Image

import thyme
from thyme.backends.base import FINISH_LENGTH, SamplingParams
from thyme.cli import main
from thyme.commands.answer import BlankLineSqueezer

EXAMPLES = Path(thyme.__file__).parent / "data" / "examples"
IMAGE = str(EXAMPLES / "17127.jpg")
SCRIPT = str(EXAMPLES / "readme_17127.json")


def test_scripted_answer_says_it_is_a_replay_of_another_image(tmp_path: Path, capsys) -> None:
    other = tmp_path / "cat.png"
    Image.new("RGB", (64, 48), (10, 200, 10)).save(other)
    assert main(["answer", str(other), "What animal is this?", "--scripted", SCRIPT]) == 0
    captured = capsys.readouterr()
    assert "note: scripted replay of" in captured.err and "no model runs" in captured.err
    assert "it was recorded on 17127.jpg, so its answer is not about cat.png" in captured.err
    assert captured.out.rstrip().endswith("Answer: C. S QT 911")  # the recording, whatever was asked
    assert main(["answer", IMAGE, "Q?", "--scripted", SCRIPT, "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["scripted"] is True
    assert "note: scripted replay" in captured.err and "recorded on" not in captured.err  # same image: no warning


def test_blank_lines_are_squeezed_but_text_and_indentation_kept() -> None:
    out = io.StringIO()
    squeezer = BlankLineSqueezer(out)
    for piece in ["a\n", "\n\n", "  \n\n", "\n", "b\n", "    c = 1\n\n\n  ", "  d"]:
        squeezer.write(piece)
    assert out.getvalue() == "a\n\nb\n    c = 1\n\n    d"


def test_tiny_model_answer_ends_with_a_summary_of_the_loop(tiny_model_dir: Path, capsys) -> None:
    argv = ["answer", IMAGE, "What is the plate number?", "--model", str(tiny_model_dir), "--device", "cpu",
            "--max-new-tokens", "8"]  # fmt: skip
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "[call 1: generating up to 8 tokens...]" in captured.err  # progress while a local model works
    summary = captured.out.rstrip().splitlines()[-2]
    assert summary.startswith("[") and "generation call(s)" in summary and "new tokens" in summary
    assert "stop reason: " in summary
    assert "\n\n\n" not in captured.out


def test_new_tokens_stop_at_the_context_window(tiny_model_dir: Path) -> None:
    from thyme.backends.local import TransformersBackend

    backend = TransformersBackend.from_pretrained(tiny_model_dir, device="cpu")
    assert backend.context_length == 4096  # the tiny checkpoint's max_position_embeddings
    messages = [{"role": "user", "content": [{"type": "text", "text": "Hello there"}]}]
    prompt_length = int(backend.prepare_inputs(messages)["input_ids"].shape[1])
    backend.context_length = prompt_length + 3
    generation = backend.generate(messages, stop=[], sampling=SamplingParams(max_new_tokens=50))
    assert len(generation.token_ids) <= 3
    backend.context_length = prompt_length
    full = backend.generate(messages, stop=[], sampling=SamplingParams(max_new_tokens=50))
    assert (full.text, full.finish_reason, full.token_ids) == ("", FINISH_LENGTH, [])


def test_full_context_ends_the_attempt_with_its_own_reason(tmp_path: Path, sandbox) -> None:
    from thyme.backends.base import Generation
    from thyme.config import AgentConfig
    from thyme.loop import STOP_CONTEXT, AttemptFinished, RolloutRequest, run_rollout

    class _FullBackend:
        def generate(self, messages, *, stop, sampling):
            return Generation("", FINISH_LENGTH, 4096, token_ids=[], logprobs=[])

    request = RolloutRequest("Q?", IMAGE, 10, 10, tmp_path)
    config = AgentConfig(max_attempts=1, use_fallback=False)
    events = list(run_rollout(_FullBackend(), sandbox, request, config))
    assert [e.stop_reason for e in events if isinstance(e, AttemptFinished)] == [STOP_CONTEXT]
