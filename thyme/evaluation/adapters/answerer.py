"""The toolkit-independent part of the adapters: keyword arguments in, answer text out.

Toolkits construct a model from strings (VLMEvalKit's ``partial(Cls, **kwargs)``, lmms-eval's
``--model_args pretrained=...,mode=direct``) and then ask for one answer per sample. This class turns those strings
into a backend and an :class:`~thyme.config.AgentConfig`, and answers with the same code paths as ``thyme eval``
(:class:`~thyme.agent.ThymeAgent` or :func:`~thyme.evaluation.harness.generate_direct`), so a score from a toolkit
and one from ``thyme eval`` differ only in the toolkit's own scoring.
"""

from __future__ import annotations

import logging
import typing
from typing import Any

from thyme.config import AgentConfig
from thyme.errors import ConfigError
from thyme.images import ImageSource, open_input_image

logger = logging.getLogger(__name__)

ADAPTER_MODES = ("thyme", "direct")


def _coerce(name: str, value: Any, annotation: Any) -> Any:
    """Toolkits pass every argument as a string ("5", "False"); convert it to the AgentConfig field's type."""
    base = next((t for t in typing.get_args(annotation) or (annotation,) if t is not type(None)), str)
    if not isinstance(value, str) or base is str:
        return value
    if base is bool:
        if value.lower() not in ("true", "false", "1", "0"):
            raise ConfigError(f"{name}={value!r}: expected true or false")
        return value.lower() in ("true", "1")
    try:
        return base(value)
    except ValueError as exc:
        raise ConfigError(f"{name}={value!r}: expected a {base.__name__}") from exc


def agent_config_from_strings(options: dict[str, Any]) -> AgentConfig:
    """Builds an AgentConfig from toolkit keyword arguments; unknown names are an error that lists the valid ones.

    Raises:
        ConfigError: an unknown option or a value of the wrong type.

    Example:
        >>> agent_config_from_strings({"max_generation_calls": "3", "use_fallback": "false"}).max_generation_calls
        3
    """
    hints = typing.get_type_hints(AgentConfig)
    unknown = sorted(set(options) - set(hints))
    if unknown:
        raise ConfigError(f"unknown Thyme option(s) {', '.join(unknown)}; valid: {', '.join(sorted(hints))}")
    return AgentConfig(**{name: _coerce(name, value, hints[name]) for name, value in options.items()})


class ToolkitAnswerer:
    """Answers (image, question) pairs for a toolkit adapter.

    Args:
        model_path: a hub id (``Kwai-Keye/Thyme-RL``) or a local checkpoint, loaded with transformers.
        endpoint: an OpenAI-compatible server URL instead of ``model_path``.
        model_name: the model name to request from ``endpoint``.
        mode: ``"thyme"`` (tool loop) or ``"direct"`` (one plain generation, the baseline).
        backend: a ready backend (tests, or a caller that built one); replaces ``model_path``/``endpoint``.
        device: transformers device for ``model_path`` (``cuda``, ``cpu``, ``auto``); default: cuda if any.
        dtype: transformers dtype for ``model_path`` (``auto``, ``bfloat16``...).
        **agent_options: :class:`~thyme.config.AgentConfig` fields, as values or strings
            (``max_generation_calls="5"``); eval defaults to one attempt so that greedy runs are deterministic.

    Raises:
        ConfigError: no or two model sources, an unknown mode or option.
    """

    def __init__(
        self,
        model_path: str | None = None,
        endpoint: str | None = None,
        model_name: str | None = None,
        mode: str = "thyme",
        backend: Any = None,
        device: str | None = None,
        dtype: str = "auto",
        **agent_options: Any,
    ) -> None:
        if mode not in ADAPTER_MODES:
            raise ConfigError(f"mode ({mode!r}) must be one of {', '.join(ADAPTER_MODES)}")
        if sum(x is not None for x in (model_path, endpoint, backend)) != 1:
            raise ConfigError("give exactly one of model_path (hub id or directory) or endpoint (OpenAI URL)")
        agent_options.setdefault("max_attempts", 1)
        self.mode = mode
        self.config = agent_config_from_strings(agent_options)
        self.backend = (
            backend if backend is not None else _build_backend(model_path, endpoint, model_name, device, dtype)
        )
        self._agent: Any = None

    def answer(self, image: ImageSource | list[ImageSource], question: str, item_id: str | None = None) -> str:
        """Returns the answer text (inside ``<answer>``; the original's "No answer tag found..." when none).

        Args:
            image: a path, PIL image or numpy array (toolkits hand over PIL images), or a list of them.
            question: the already formatted question.
            item_id: the sample id used in sandbox error messages.
        """
        if self.mode == "thyme":
            return self._thyme_agent().answer(image, question, item_id=item_id).answer
        from thyme.evaluation.harness import direct_answer, generate_direct

        sources = []
        try:
            for each in image if isinstance(image, list) else [image]:
                sources.append(open_input_image(each, max_pixels=self.config.max_input_pixels))
            paths = [source.path for source in sources]
            return direct_answer(generate_direct(self.backend, paths, question, self.config))
        finally:
            for source in sources:
                source.cleanup()

    def _thyme_agent(self) -> Any:
        if self._agent is None:
            from thyme.agent import ThymeAgent

            self._agent = ThymeAgent(self.backend, config=self.config)
        return self._agent

    def close(self) -> None:
        """Releases the sandbox and the backend."""
        if self._agent is not None:
            self._agent.close()  # closes the backend too
            self._agent = None
        else:
            self.backend.close()


def _build_backend(
    model_path: str | None, endpoint: str | None, model_name: str | None, device: str | None, dtype: str
) -> Any:
    from thyme.backends import BACKENDS

    if endpoint is not None:
        return BACKENDS["openai"](endpoint, model=model_name)
    from thyme.agent import ThymeAgent

    return ThymeAgent.from_pretrained(str(model_path), device=device, dtype=dtype).backend
