"""The colocated vLLM engine of ``thyme-train`` (``use_vllm: true``, ``vllm_mode: colocate``) and its weight sync.

Built on TRL's ``VLLMGeneration`` (trl 1.16.0), which keeps what it does well: the process-group environment for an
in-process engine per training process (``external_launcher``) and the parameter walk that gathers DeepSpeed/FSDP
shards and merges PEFT adapters under the names vLLM expects. Two parts are replaced:

- **The engine.** TRL starts it with ``logprobs_mode="processed_logprobs"``, vLLM's default dtype (bfloat16 on a CPU
  even for a float32 policy), no image limits and no pixel limits. Thyme needs raw log-probs (see
  :mod:`thyme.train.vllm_rollout`), the policy's own dtype (so the importance ratio measures the policy, not a
  dtype cast), room for one image per code round plus the input (``limit_mm_per_prompt``) and the trainer's
  ``min_pixels``/``max_pixels`` (so vLLM resizes every image exactly as the loss forward does).
- **The weight sync.** TRL calls ``model.load_weights([(name, tensor)])`` on the live vLLM model. That works on a GPU
  and fails on vLLM's CPU backend with ``AttributeError: 'Parameter' object has no attribute 'weight_loader'``
  (env-findings.md section 7). Why: after loading, vLLM's CPU ``UnquantizedLinearMethod.process_weights_after_
  loading`` calls ``dispatch_cpu_unquantized_gemm(layer, remove_weight=True)``, which packs every linear weight
  into a oneDNN / sgl-kernel handle captured by ``layer.cpu_linear`` and REPLACES ``layer.weight`` with an empty
  plain ``nn.Parameter`` (no ``weight_loader``, zero elements). So there is nothing to load into, and even a
  successful copy would not reach the packed weight the forward uses. The CPU backend's weight layout is the
  cause, not TRL's name mapping (the embedding and norm weights, which are not packed, load fine). vLLM's own
  in-place reload (``Worker.reload_weights(weights_iterator=..., is_checkpoint_format=True)``) restores each
  layer's checkpoint-format parameters with their loaders, loads the new tensors and runs
  ``process_weights_after_loading`` again, which re-packs them; that is what :meth:`ColocateVLLM.sync_weights`
  calls, on every backend. The encoder and multimodal caches are reset on the scheduler side too: the worker
  clears its encoder cache on reload, and a scheduler that still believes an image's embedding is cached fails
  the next request with ``Encoder cache miss``.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from trl.generation.vllm_generation import VLLMGeneration
from trl.trainer.utils import ensure_master_addr_port

logger = logging.getLogger(__name__)


def vllm_image_limit(max_generation_calls: int, override: int | None = None) -> int:
    """Images one trajectory may carry: the input, plus one per code round (a round costs two calls under ATS)."""
    if override is not None:
        return override
    return 1 + max_generation_calls // 2


class ColocateVLLM(VLLMGeneration):
    """An in-process vLLM engine per training process, started for Thyme's rollouts, with a working weight sync.

    Args:
        model / accelerator / processing_class: the trainer's (as TRL's ``VLLMGeneration``).
        max_images: ``limit_mm_per_prompt`` for images (see :func:`vllm_image_limit`).
        min_pixels / max_pixels: the trainer's image bounds, handed to vLLM's image processor.
        kv_cache_bytes: KV-cache size; None lets vLLM size it from ``gpu_memory_utilization``.
        llm: an already started ``vllm.LLM`` to use instead of starting one (one engine shared by several trainers
            in a process: tests, notebooks); it must have been started by :func:`start_colocate_llm`'s settings.
        **kwargs: TRL's colocate settings (``gpu_memory_utilization``, ``max_model_length``, ``max_num_seqs``,
            ``tensor_parallel_size``, ``model_impl``, ``trust_remote_code``).
    """

    def __init__(
        self,
        model: Any,
        accelerator: Any,
        processing_class: Any,
        *,
        max_images: int,
        min_pixels: int,
        max_pixels: int,
        kv_cache_bytes: int | None = None,
        llm: Any = None,
        **kwargs: Any,
    ) -> None:
        self.engine_lock: Any = None  # the rollout driver's lock, held while the weights are replaced
        self._thyme_engine = {
            "max_images": max_images,
            "min_pixels": min_pixels,
            "max_pixels": max_pixels,
            "kv_cache_bytes": kv_cache_bytes,
            "llm": llm,
        }
        super().__init__(model, accelerator, processing_class, mode="colocate", **kwargs)

    def _init_vllm(self) -> None:
        accelerator = self.accelerator
        if self.tensor_parallel_size != 1:
            raise NotImplementedError("Thyme's colocated vLLM rollouts run one engine per process (tensor_parallel 1)")
        settings = self._thyme_engine
        if settings["llm"] is not None:
            self.llm = settings["llm"]
        else:
            os.environ["RANK"] = str(accelerator.process_index)
            os.environ["LOCAL_RANK"] = str(accelerator.local_process_index)
            os.environ["WORLD_SIZE"] = str(accelerator.num_processes)
            ensure_master_addr_port()
            self.llm = start_colocate_llm(
                self.model.name_or_path,
                dtype=self.model.dtype,
                max_images=settings["max_images"],
                min_pixels=settings["min_pixels"],
                max_pixels=settings["max_pixels"],
                kv_cache_bytes=settings["kv_cache_bytes"],
                gpu_memory_utilization=self.gpu_memory_utilization,
                max_model_len=self.max_model_length,
                max_num_seqs=self.max_num_seqs,
                model_impl=self.model_impl,
                trust_remote_code=self.trust_remote_code,
                seed=accelerator.process_index,
            )
        self._llm_weights_sleeping = False  # sleep mode is refused by ThymeGRPOConfig
        accelerator.wait_for_everyone()

    def sync_weights(self) -> None:
        """Loads the policy's current weights into the engine (vLLM's in-place reload; see the module docstring)."""
        worker = self.llm.llm_engine.model_executor.driver_worker
        worker = getattr(worker, "worker", worker)  # WorkerWrapperBase -> the device worker
        lock = self.engine_lock
        if lock is not None:
            lock.acquire()
        try:
            worker.reload_weights(weights_iterator=self._iter_named_params(), is_checkpoint_format=True)
            refresh_tied_lm_heads(worker.model_runner.get_model())
            engine = self.llm.llm_engine
            engine.reset_prefix_cache()
            engine.reset_encoder_cache()
            engine.reset_mm_cache()
        finally:
            if lock is not None:
                lock.release()


def refresh_tied_lm_heads(model: Any) -> None:
    """Re-ties each output head to its input embedding and re-runs its weight processing after a reload.

    With tied embeddings (Qwen2.5-VL 3B, the tiny model) the checkpoint has no ``lm_head.weight``, so the reload
    loads and processes only ``embed_tokens``. On a CPU the head keeps the oneDNN/sgl-kernel copy packed from the
    OLD weight at start-up (``dispatch_cpu_unquantized_gemm(remove_weight=False)``), and the logits stay those of the
    old policy (measured: 1.55 nats off after a perturbed embedding, 5e-7 with this refresh).
    """
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

    for module in model.modules():
        head = getattr(module, "lm_head", None)
        embed = getattr(getattr(module, "model", None), "embed_tokens", None)
        config = getattr(module, "config", None)
        if not isinstance(head, ParallelLMHead) or embed is None:
            continue
        if getattr(config, "tie_word_embeddings", False) or head.weight is embed.weight:
            head.weight = embed.weight
            head.quant_method.process_weights_after_loading(head)


def start_colocate_llm(
    model: str,
    *,
    dtype: Any,
    max_images: int,
    min_pixels: int,
    max_pixels: int,
    kv_cache_bytes: int | None = None,
    gpu_memory_utilization: float = 0.3,
    max_model_len: int | None = None,
    max_num_seqs: int | None = None,
    model_impl: str = "auto",
    trust_remote_code: bool = False,
    seed: int = 0,
) -> Any:
    """Starts the in-process ``vllm.LLM`` Thyme's rollouts need (raw log-probs, the policy's dtype, image limits).

    The process must have ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT`` set (``external_launcher``: one
    engine inside each training process); :class:`ColocateVLLM` sets them from the accelerator.
    """
    from vllm import LLM

    from thyme.train.vllm_rollout import vllm_processor_kwargs

    on_cpu = _vllm_on_cpu()
    return LLM(
        model=model,
        dtype=str(dtype).removeprefix("torch."),
        distributed_executor_backend="external_launcher",
        logprobs_mode="raw_logprobs",
        limit_mm_per_prompt={"image": max_images},
        mm_processor_kwargs=vllm_processor_kwargs(min_pixels, max_pixels),
        kv_cache_memory_bytes=kv_cache_bytes,
        gpu_memory_utilization=gpu_memory_utilization,
        max_model_len=max_model_len,
        max_num_seqs=max_num_seqs,
        model_impl=model_impl,
        trust_remote_code=trust_remote_code,
        enforce_eager=on_cpu,  # CPU: no graph capture to gain, and compiling costs a minute per start
        seed=seed,
    )


def _vllm_on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()
