"""Wires vLLM into a :class:`~thyme.train.trainer.ThymeGRPOTrainer` (``use_vllm: true``), in TRL's two modes.

- ``colocate``: one in-process engine per training process (:class:`~thyme.train.vllm_sync.ColocateVLLM`), fed by a
  :class:`~thyme.train.vllm_rollout.VLLMEngineDriver`; weights synced in place after every optimizer step.
- ``server``: a ``vllm serve`` on other GPUs. Every trainer process sends its own rollouts' requests
  (:mod:`thyme.train.vllm_server`); the weights go over TRL's NCCL weight-transfer protocol (TRL's
  ``VLLMGeneration`` in server mode, from the main process).

In both, ``trainer.vllm_generation.sync_weights()`` is what TRL's ``_generate`` calls once per optimizer step, and
``trainer.use_vllm`` turns on TRL's importance-sampling correction against the log-probs the engine reported.
"""

from __future__ import annotations

from typing import Any

from thyme.train.vllm_rollout import VLLMEngineDriver, VLLMPolicyBackend
from thyme.train.vllm_sync import ColocateVLLM, vllm_image_limit

_GIB = 1 << 30


class ColocateRollouts:
    """The colocated engine, its request driver and the backends of one trainer."""

    def __init__(self, generation: ColocateVLLM):
        self.generation = generation
        self.driver = VLLMEngineDriver(generation.llm)
        generation.engine_lock = self.driver.engine_lock

    def backend(self, processor: Any, **options: Any) -> VLLMPolicyBackend:
        return VLLMPolicyBackend(self.driver, processor, **options)

    def close(self) -> None:
        self.driver.close()


def setup_vllm(trainer: Any, llm: Any = None) -> Any:
    """Starts (or connects to) the engine for ``trainer.args.vllm_mode``; returns the trainer's rollout engine.

    Sets ``trainer.use_vllm``, ``trainer.vllm_generation`` and ``trainer._last_loaded_step`` as TRL's own
    ``__init__`` would have.
    """
    args = trainer.args
    trainer.use_vllm = True
    trainer._last_loaded_step = -1
    common = {
        "max_num_seqs": args.per_device_train_batch_size * args.steps_per_generation,
        "max_model_length": args.vllm_max_model_length,
        "model_impl": args.vllm_model_impl,
        "trust_remote_code": args.trust_remote_code,
    }
    if args.vllm_mode == "server":
        from thyme.train.vllm_server import ServerRollouts

        rollouts = ServerRollouts.connect(trainer)
        trainer.vllm_generation = rollouts.generation
        return rollouts
    generation = ColocateVLLM(
        trainer.model,
        trainer.accelerator,
        trainer.processing_class,
        max_images=vllm_image_limit(args.max_generation_calls, args.vllm_max_images),
        min_pixels=args.min_pixels,
        max_pixels=args.max_pixels,
        kv_cache_bytes=int(args.vllm_kv_cache_gib * _GIB) if args.vllm_kv_cache_gib else None,
        llm=llm,
        tensor_parallel_size=args.vllm_tensor_parallel_size,
        gpu_memory_utilization=args.vllm_gpu_memory_utilization,
        **common,
    )
    trainer.vllm_generation = generation
    return ColocateRollouts(generation)
