"""ThymeAgent: ask a question about an image, get the answer and the whole reasoning trajectory.

The agent owns the pieces a question needs (a backend, one sandbox, a config) and runs
:func:`thyme.loop.run_rollout`, the same loop the evaluator, the demo and the trainer use. Each question gets its own
sandbox session(s) and its own directory for the images the code produced.

Example::

    from thyme import ThymeAgent
    with ThymeAgent.from_pretrained("Kwai-Keye/Thyme-RL") as agent:
        result = agent.answer("photo.jpg", "What is the plate number?")
        print(result.answer)
        for part in result.trajectory.parts(): ...
"""

from __future__ import annotations

import logging
import re
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from thyme.backends.base import Backend
from thyme.config import AgentConfig
from thyme.errors import ConfigError, ModelNotFoundError
from thyme.images import ImageSource, InputImage, open_input_image
from thyme.loop import Event, Finished, RolloutRequest, RolloutResult, run_rollout

logger = logging.getLogger(__name__)

# "org/name" (optionally "@revision"-free): what the Hugging Face hub accepts as a repository id.
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_WEIGHTS_HINT = (
    "download the weights first, e.g. `hf download Kwai-Keye/Thyme-RL --local-dir ./Thyme-RL` "
    "(or Kwai-Keye/Thyme-SFT), then pass that directory; for a dry run build a tiny model with `thyme tiny-model DIR`"
)


class ThymeAgent:
    """Answers questions about images by letting the model write code that a sandbox runs.

    Args:
        backend (`Backend`): what produces the model text (``thyme.backends.BACKENDS``).
        config (`AgentConfig`, *optional*): budget, sampling, failure handling; defaults reproduce the original eval.
        sandbox (`thyme.sandbox.Sandbox`, *optional*): the sandbox to use; the agent creates (and closes) one with
            ``config.sandbox_timeout_s`` when none is given. A given sandbox is not closed by the agent.
    """

    def __init__(self, backend: Backend, config: AgentConfig | None = None, sandbox: Any | None = None):
        self.backend = backend
        self.config = config or AgentConfig()
        self._sandbox = sandbox
        self._owns_sandbox = sandbox is None

    @classmethod
    def from_pretrained(
        cls,
        id_or_path: str | Path,
        *,
        config: AgentConfig | None = None,
        sandbox: Any | None = None,
        engine: str = "transformers",
        **backend_kwargs,
    ) -> ThymeAgent:
        """Loads released weights (``Kwai-Keye/Thyme-RL``, ``Kwai-Keye/Thyme-SFT``) or a local directory with the
        transformers backend, or with an in-process vLLM engine (``engine="vllm"``, docs/vllm.md).

        Args:
            id_or_path (`str | Path`): a hub id or a local directory.
            config (`AgentConfig`, *optional*): agent settings.
            sandbox (`thyme.sandbox.Sandbox`, *optional*): a sandbox to share.
            engine (`str`, defaults to `"transformers"`): ``"transformers"`` or ``"vllm"``.
            **backend_kwargs: passed to ``TransformersBackend.from_pretrained`` (``dtype``, ``device``,
                ``attn_implementation``) or ``VLLMBackend.from_pretrained`` (``dtype``, ``max_model_len``, any
                ``vllm.LLM`` argument).

        Raises:
            ModelNotFoundError: the path does not exist (the message says how to get the weights), or the backend
                cannot find or download the weights.
            ConfigError: an unknown ``engine``, or ``"vllm"`` without vLLM installed.
        """
        from thyme.backends import BACKENDS

        if engine not in ("transformers", "vllm"):
            raise ConfigError(f"unknown engine {engine!r}: choose transformers or vllm")

        text, path = str(id_or_path), Path(id_or_path).expanduser()
        if path.exists():
            text = str(path)
        elif not _HUB_ID_RE.match(text):
            raise ModelNotFoundError(f"model path {text} does not exist: {_WEIGHTS_HINT}")
        backend = BACKENDS[engine].from_pretrained(text, **backend_kwargs)
        return cls(backend, config=config, sandbox=sandbox)

    @property
    def sandbox(self) -> Any:
        """The sandbox; created on first use so that building an agent costs no worker processes."""
        if self._sandbox is None:
            from thyme.sandbox import Sandbox

            self._sandbox = Sandbox(timeout=self.config.sandbox_timeout_s)
        return self._sandbox

    def stream(
        self, image: ImageSource | Sequence[ImageSource], question: str, *, item_id: str | None = None
    ) -> Iterator[Event]:
        """Runs the loop and yields its events as they happen (see :mod:`thyme.loop`); the last is ``Finished``.

        Args:
            image (`str | Path | PIL.Image.Image | numpy.ndarray`, or a list of them): the image to ask about
                (numpy: RGB, uint8), or several images for one question (the model sees them all, in order; the
                code gets every path).
            question (`str`): the question, already formatted if it is a benchmark item (``thyme.prompts.format_*``).
            item_id (`str`, *optional*): the id in sandbox error messages; default: the image file's stem.

        Raises:
            ConfigError: the question is empty.
            ImageError: the image is missing, corrupt, not an image or too large.
        """
        if not isinstance(question, str) or not question.strip():
            raise ConfigError("the question is empty: pass the text of the question to ask about the image")
        images = list(image) if isinstance(image, (list, tuple)) else [image]
        if not images:
            raise ConfigError("no image given: pass an image, or a list of one or more images")
        sources: list[InputImage] = []
        try:
            for each in images:
                sources.append(open_input_image(each, max_pixels=self.config.max_input_pixels))
            first, more = sources[0], [(s.path, s.width, s.height) for s in sources[1:]]
            images_dir = self.config.images_dir or Path(tempfile.mkdtemp(prefix="thyme-images-"))
            request = RolloutRequest(question, first.path, first.width, first.height, Path(images_dir), item_id, more)
            yield from run_rollout(self.backend, self.sandbox, request, self.config)
        finally:
            for source in sources:
                source.cleanup()

    def answer(
        self, image: ImageSource | Sequence[ImageSource], question: str, *, item_id: str | None = None
    ) -> RolloutResult:
        """Answers ``question`` about ``image`` (one image or a list); returns the result (``.answer``,
        ``.trajectory``, counters).

        Raises:
            ConfigError, ImageError: bad input (see :meth:`stream`). A model's bad output never raises: it ends as a
                result with ``has_answer=False`` or the fallback's answer.
        """
        for event in self.stream(image, question, item_id=item_id):
            if isinstance(event, Finished):
                return event.result
        raise AssertionError("run_rollout ended without a Finished event")  # unreachable: the loop always finishes

    def close(self) -> None:
        """Closes the sandbox the agent created and the backend."""
        if self._owns_sandbox and self._sandbox is not None:
            self._sandbox.close()
            self._sandbox = None
        self.backend.close()

    def __enter__(self) -> ThymeAgent:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


__all__ = ["ThymeAgent"]
