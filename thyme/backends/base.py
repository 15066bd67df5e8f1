"""The seam between the rollout loop and whatever produces tokens (CONTRACTS.md section 2).

A backend turns a chat (Hugging Face multimodal message format) into ONE continuation of the assistant message. The
loop decides what to stop at and how to sample (ATS is a loop policy, design.md section 2); the backend only obeys.

Message format::

    [{"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]},
     {"role": "user", "content": [{"type": "image", "image": "/abs/in.jpg"},
                                  {"type": "text", "text": "\\n<question>..."}]},
     {"role": "assistant", "content": [{"type": "text", "text": "<think>..."},
                                       {"type": "image", "image": "/scratch/a.png"},
                                       {"type": "text", "text": "</sandbox_output>..."}]}]

If the last message is an assistant message the backend CONTINUES it (no new header, no end-of-turn token);
otherwise it opens the assistant turn. Image items may carry ``min_pixels`` / ``max_pixels`` (qwen-vl-utils
convention); every image in ``messages`` must really be encoded on every call.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

# finish_reason values of a Generation.
FINISH_STOP = "stop"  # a stop string was produced; Generation.text ends with it
FINISH_EOS = "eos"  # the model ended its turn (<|im_end|> / end of sequence)
FINISH_LENGTH = "length"  # max_new_tokens was reached
FINISH_REASONS = (FINISH_STOP, FINISH_EOS, FINISH_LENGTH)


@dataclass(frozen=True)
class SamplingParams:
    """How one generation call samples. ``temperature == 0.0`` means greedy (the original eval's setting).

    Args:
        temperature (`float`, defaults to `0.0`): 0.0 = greedy decoding.
        top_p (`float`, defaults to `1.0`): nucleus sampling mass; 1.0 = off.
        top_k (`int`, defaults to `0`): keep the k most likely tokens; 0 = off.
        repetition_penalty (`float`, defaults to `1.0`): 1.0 = off (the original RL used 1.05 for prose).
        max_new_tokens (`int`, defaults to `2048`): cap of new tokens for THIS call (the original's per-call cap).
        seed (`int`, *optional*): seed for reproducible sampling where the backend supports it.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    max_new_tokens: int = 2048
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        """True when this call decodes greedily."""
        return self.temperature == 0.0


@dataclass
class Generation:
    """What one backend call produced.

    Args:
        text (`str`): the new text, special tokens skipped; it ENDS WITH the stop string when one was hit.
        finish_reason (`str`): ``"stop"`` (a stop string), ``"eos"`` (end of turn) or ``"length"`` (max_new_tokens).
        prompt_tokens (`int`): prompt tokens this call had to process (prefill work; cached ones excluded).
        token_ids (`list[int]`, *optional*): the new token ids, when the backend knows them (local backend).
        logprobs (`list[float]`, *optional*): per new token, log p at temperature 1 of the raw distribution, so a
            trainer can use greedy code tokens without a temperature mismatch (design.md section 5).
    """

    text: str
    finish_reason: str
    prompt_tokens: int
    token_ids: list[int] | None = None
    logprobs: list[float] | None = None


@runtime_checkable
class Backend(Protocol):
    """Anything that continues a Thyme chat. Implementations: ``thyme.backends.BACKENDS``."""

    def generate(self, messages: list[dict], *, stop: Sequence[str], sampling: SamplingParams) -> Generation:
        """Continues ``messages`` until a string in ``stop``, the end of the turn, or ``sampling.max_new_tokens``."""
        ...

    def close(self) -> None:
        """Releases the model, the HTTP client or whatever the backend holds."""
        ...


__all__ = [
    "FINISH_EOS",
    "FINISH_LENGTH",
    "FINISH_REASONS",
    "FINISH_STOP",
    "Backend",
    "Generation",
    "SamplingParams",
]
