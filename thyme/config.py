"""AgentConfig: every knob of the agent and its rollout loop, shared by the CLI, the agent, eval and the demo.

Defaults reproduce the original evaluation (greedy, 5 generation calls of at most 2048 new tokens, qwen-vl-utils
pixel limits), with its bugs fixed (reference 1.8): sandbox errors are shown to the model, retries really sample,
and the user turn matches training's image placement.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

from thyme.backends.base import SamplingParams
from thyme.errors import ConfigError
from thyme.images import DEFAULT_MAX_INPUT_PIXELS

DEFAULT_MAX_GENERATION_CALLS = 5
DEFAULT_MIN_PIXELS = 3136  # 4 * 28 * 28, qwen-vl-utils default
DEFAULT_MAX_PIXELS = 12_845_056  # 16384 * 28 * 28, qwen-vl-utils default
SAMPLING_MODES = ("greedy", "ats")


@dataclass
class AgentConfig:
    """Settings of :class:`~thyme.agent.ThymeAgent` and :func:`~thyme.loop.run_rollout`.

    > Budget and decoding
    max_generation_calls, max_new_tokens, sampling, temperature, top_p, top_k, repetition_penalty, seed
    > Failure handling
    max_attempts, use_fallback, show_sandbox_errors, repetition_min_chars
    > Images and sandbox
    min_pixels, max_pixels, max_input_pixels, eval_image_quirk, sandbox_timeout_s, images_dir
    """

    max_generation_calls: int = field(
        default=DEFAULT_MAX_GENERATION_CALLS,
        metadata={"help": "backend generate calls per attempt (the original's 5); an ATS code round costs 2"},
    )
    max_new_tokens: int = field(default=2048, metadata={"help": "new tokens per generation call"})
    sampling: str = field(
        default="greedy",
        metadata={"help": "'greedy' (original eval) or 'ats' (prose sampled with the settings below, code greedy)"},
    )
    temperature: float = field(default=1.0, metadata={"help": "prose temperature under ATS and for retries"})
    top_p: float = field(default=0.9, metadata={"help": "prose top-p under ATS and for retries"})
    top_k: int = field(default=50, metadata={"help": "prose top-k under ATS and for retries (0 = off)"})
    repetition_penalty: float = field(
        default=1.05, metadata={"help": "prose repetition penalty under ATS and for retries (never in code)"}
    )
    seed: int | None = field(default=None, metadata={"help": "sampling seed, where the backend supports one"})
    max_attempts: int = field(
        default=2,
        metadata={"help": "attempts before the fallback prompt; attempts after the first sample prose (ATS settings)"},
    )
    use_fallback: bool = field(
        default=True, metadata={"help": "after every attempt failed, ask once with the plain fallback prompt"}
    )
    show_sandbox_errors: bool = field(
        default=True,
        metadata={"help": "show sandbox errors to the model (RL behaviour); False drops the failed block (eval)"},
    )
    repetition_min_chars: int = field(
        default=400,
        metadata={"help": "end an attempt when a length-capped call ends in a loop this long (0 = never)"},
    )
    min_pixels: int = field(default=DEFAULT_MIN_PIXELS, metadata={"help": "min pixels of each image the model sees"})
    max_pixels: int = field(default=DEFAULT_MAX_PIXELS, metadata={"help": "max pixels of each image the model sees"})
    max_input_pixels: int = field(
        default=DEFAULT_MAX_INPUT_PIXELS, metadata={"help": "refuse input images with more pixels than this"}
    )
    eval_image_quirk: bool = field(
        default=False,
        metadata={"help": "keep the official eval's literal '<image>' after the vision block (score parity only)"},
    )
    sandbox_timeout_s: float = field(default=10.0, metadata={"help": "wall-clock limit of one code block, seconds"})
    images_dir: Path | None = field(
        default=None,
        metadata={"help": "where sandbox images are kept after the run; default: a new temp directory per question"},
    )

    def __post_init__(self) -> None:
        if self.images_dir is not None:
            self.images_dir = Path(self.images_dir)
        for name in ("max_generation_calls", "max_new_tokens", "max_attempts", "min_pixels", "max_input_pixels"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} ({getattr(self, name)}) must be at least 1")
        if self.sampling not in SAMPLING_MODES:
            raise ConfigError(f"sampling ({self.sampling!r}) must be one of {', '.join(SAMPLING_MODES)}")
        if self.sampling == "ats" and self.max_generation_calls < 2:
            raise ConfigError("sampling='ats' needs max_generation_calls >= 2: a code round costs two calls")
        if self.temperature <= 0:
            raise ConfigError(f"temperature ({self.temperature}) must be > 0; use sampling='greedy' for greedy prose")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p ({self.top_p}) must be in (0, 1]")
        if self.top_k < 0 or self.repetition_min_chars < 0:
            raise ConfigError("top_k and repetition_min_chars must be >= 0 (0 turns them off)")
        if self.repetition_penalty <= 0:
            raise ConfigError(f"repetition_penalty ({self.repetition_penalty}) must be > 0 (1.0 = off)")
        if self.max_pixels < self.min_pixels:
            raise ConfigError(
                f"max_pixels ({self.max_pixels}) < min_pixels ({self.min_pixels}): "
                "raise max_pixels or lower min_pixels"
            )
        if self.sandbox_timeout_s <= 0:
            raise ConfigError(f"sandbox_timeout_s ({self.sandbox_timeout_s}) must be > 0")

    def greedy_sampling(self) -> SamplingParams:
        """Greedy decoding (code spans, and everything when ``sampling='greedy'``); no repetition penalty."""
        return SamplingParams(temperature=0.0, max_new_tokens=self.max_new_tokens, seed=self.seed)

    def prose_sampling(self) -> SamplingParams:
        """The sampled prose settings (ATS, retries): the original RL's T=1.0 / top-p 0.9 / top-k 50 / 1.05."""
        return SamplingParams(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            repetition_penalty=self.repetition_penalty,
            max_new_tokens=self.max_new_tokens,
            seed=self.seed,
        )

    @property
    def image_options(self) -> dict[str, int]:
        """The keys every image item carries for the backend's smart resize."""
        return {"min_pixels": self.min_pixels, "max_pixels": self.max_pixels}

    @classmethod
    def field_help(cls) -> dict[str, str]:
        """Field name -> help text (the CLI builds its flags from it)."""
        return {f.name: f.metadata.get("help", "") for f in fields(cls)}


__all__ = ["DEFAULT_MAX_GENERATION_CALLS", "DEFAULT_MAX_PIXELS", "DEFAULT_MIN_PIXELS", "SAMPLING_MODES", "AgentConfig"]
