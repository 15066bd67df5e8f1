"""ScriptedBackend replays model text as a model would: stop strings, token caps, end of script."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import thyme
from thyme.backends import BACKENDS
from thyme.backends.base import SamplingParams
from thyme.backends.scripted import ScriptedBackend
from thyme.errors import ConfigError

EXAMPLE = Path(thyme.__file__).parent / "data" / "examples" / "readme_17127.json"


def test_stop_strings_split_a_segment_and_the_rest_comes_next():
    backend = ScriptedBackend(["think <code>x</code> after"])
    first = backend.generate([], stop=["<code>"], sampling=SamplingParams())
    second = backend.generate([], stop=["</code>"], sampling=SamplingParams())
    third = backend.generate([], stop=["</code>"], sampling=SamplingParams())
    assert (first.text, first.finish_reason) == ("think <code>", "stop")
    assert (second.text, second.finish_reason) == ("x</code>", "stop")
    assert (third.text, third.finish_reason) == (" after", "eos")
    assert backend.generate([], stop=[], sampling=SamplingParams()).text == ""
    assert [call.stop for call in backend.calls] == [("<code>",), ("</code>",), ("</code>",), ()]


def test_length_cap_in_pseudo_tokens():
    backend = ScriptedBackend(["abcdefghij"], chars_per_token=2)
    generation = backend.generate([], stop=[], sampling=SamplingParams(max_new_tokens=3))
    assert (generation.text, generation.finish_reason) == ("abcdef", "length")
    assert backend.remaining == ["ghij"]


def test_prompt_tokens_count_the_text_items():
    backend = ScriptedBackend(["a"], chars_per_token=1)
    messages = [{"role": "user", "content": [{"type": "image", "image": "/x.png"}, {"type": "text", "text": "abc"}]}]
    assert backend.generate(messages, stop=[], sampling=SamplingParams()).prompt_tokens == 3


def test_loads_the_readme_example_and_a_saved_trajectory(tmp_path):
    example = json.loads(EXAMPLE.read_text(encoding="utf-8"))
    assert ScriptedBackend(EXAMPLE).remaining == example["segments"]
    saved = tmp_path / "t.json"
    saved.write_text(
        json.dumps(
            {
                "segments": [
                    {"type": "model_text", "text": "a"},
                    {"type": "sandbox_output"},
                    {"type": "model_text", "text": "b"},
                ]
            }
        ),
        encoding="utf-8",
    )
    assert BACKENDS["scripted"](saved).remaining == ["a", "b"]


def test_bad_script_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read script"):
        ScriptedBackend(tmp_path / "missing.json")
    (tmp_path / "empty.json").write_text('{"segments": []}', encoding="utf-8")
    with pytest.raises(ConfigError, match="has no 'segments' list"):
        ScriptedBackend(tmp_path / "empty.json")


def test_backends_table_is_lazy_and_names_the_choices():
    assert sorted(BACKENDS) == ["openai", "scripted", "transformers", "vllm"]
    with pytest.raises(KeyError, match="choose one of"):
        BACKENDS["vllm-magic"]
