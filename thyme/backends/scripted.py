"""ScriptedBackend: replays recorded model text through the real loop, for tests, docs and dry runs.

A random tiny model never writes code, so the loop's logic is tested with recorded trajectories (smolagents'
``FakeCodeModel`` pattern, design.md section 6). The replay behaves as a model would: each call returns the script up
to and including the first stop string the LOOP asked for (the rest comes out on the next call), ends with ``"eos"``
where a script segment ends without one, and with ``"length"`` after ``max_new_tokens`` pseudo-tokens
(``chars_per_token`` characters each). Once the script is used up every call returns ``""`` with ``"eos"``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from thyme.backends.base import FINISH_EOS, FINISH_LENGTH, FINISH_STOP, Generation, SamplingParams
from thyme.errors import ConfigError

DEFAULT_CHARS_PER_TOKEN = 4  # roughly what a BPE tokenizer averages on English prose and code


@dataclass(frozen=True)
class ScriptedCall:
    """One recorded call: what the loop sent (for assertions in tests)."""

    messages: list[dict]
    stop: tuple[str, ...]
    sampling: SamplingParams


def load_script(path: str | os.PathLike) -> list[str]:
    """Reads model-text segments from JSON: a list of strings, ``{"segments": [str, ...]}`` (like
    ``thyme/data/examples/readme_17127.json``), or a saved Trajectory (its ``model_text`` segments).

    Raises:
        ConfigError: the file cannot be read or holds no segments.
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read script {path}: {exc}") from exc
    raw = data.get("segments") if isinstance(data, dict) else data
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"script {path} has no 'segments' list (expected a list of model-text strings)")
    segments = []
    for item in raw:
        if isinstance(item, str):
            segments.append(item)
        elif isinstance(item, dict) and item.get("type") == "model_text":
            segments.append(item["text"])
    if not segments:
        raise ConfigError(f"script {path} holds no model text segments")
    return segments


class ScriptedBackend:
    """Replays scripted model text, honouring the stop strings and token cap of each call.

    Args:
        script (`Sequence[str] | str | os.PathLike`): model-text segments, or a JSON file (see :func:`load_script`).
        chars_per_token (`int`, defaults to `4`): how many characters count as one token for ``max_new_tokens``
            and ``prompt_tokens``.

    Example:
        >>> from thyme.backends.base import SamplingParams
        >>> backend = ScriptedBackend(["think <code>print(1)</code> more", "<answer>1</answer>"])
        >>> backend.generate([], stop=["</code>"], sampling=SamplingParams()).text
        'think <code>print(1)</code>'
        >>> backend.generate([], stop=["</code>"], sampling=SamplingParams()).finish_reason
        'eos'
    """

    def __init__(self, script: Sequence[str] | str | os.PathLike, *, chars_per_token: int = DEFAULT_CHARS_PER_TOKEN):
        if isinstance(script, (str, os.PathLike)):
            script = load_script(script)
        if chars_per_token < 1:
            raise ConfigError(f"chars_per_token ({chars_per_token}) must be at least 1")
        self._segments = list(script)
        self._chars_per_token = chars_per_token
        self.calls: list[ScriptedCall] = []

    @property
    def remaining(self) -> list[str]:
        """The script not yet replayed."""
        return list(self._segments)

    def generate(self, messages: list[dict], *, stop: Sequence[str], sampling: SamplingParams) -> Generation:
        """Returns the next piece of the script (see the module docstring for the rules)."""
        self.calls.append(ScriptedCall(messages, tuple(stop), sampling))
        prompt_chars = sum(
            len(item.get("text", "")) for message in messages for item in message["content"] if item["type"] == "text"
        )
        prompt_tokens = prompt_chars // self._chars_per_token
        if not self._segments:
            return Generation("", FINISH_EOS, prompt_tokens)
        segment = self._segments[0]
        stops = [(segment.find(s) + len(s), s) for s in stop if s and s in segment]
        end, finish = (min(stops)[0], FINISH_STOP) if stops else (len(segment), FINISH_EOS)
        cap = sampling.max_new_tokens * self._chars_per_token
        if end > cap:
            end, finish = cap, FINISH_LENGTH
        text, rest = segment[:end], segment[end:]
        if rest:
            self._segments[0] = rest
        else:
            self._segments.pop(0)
        return Generation(text, finish, prompt_tokens)

    def close(self) -> None:
        """Nothing to release."""


__all__ = ["ScriptedBackend", "ScriptedCall", "load_script"]
