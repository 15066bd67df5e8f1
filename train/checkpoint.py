"""Checkpoint resume that restores a Qwen-VL model's weights, shared by the RL and SFT trainers.

transformers saves Qwen2.5-VL checkpoints in the original key layout (``model.layers.*``, ``visual.*``) but
``Trainer._load_from_checkpoint`` loads them with a plain ``load_state_dict`` into the renamed modules
(``model.language_model.*``, ``model.visual.*``): every key misses, a warning is logged, and training "resumes" with
the step counter and optimizer of the checkpoint but the weights of ``model_name_or_path``
(huggingface/transformers#43701, open for transformers 5.24). :class:`QwenVLResumeMixin` loads full-model
checkpoints through ``from_pretrained``, which applies the key conversion. LoRA adapters (saved by PEFT under the
live module names), DeepSpeed and FSDP checkpoints keep the stock path: they are not affected.

The RL data order must resume too: TRL's ``RepeatSampler`` draws each epoch's permutation from one generator seeded
once, so a run resumed in epoch 2 replays epoch 1's order. :class:`EpochSeededRepeatSampler` seeds each epoch's
permutation from ``seed + epoch`` (transformers calls ``set_epoch``), so an interrupted run sees the prompts an
uninterrupted one sees.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from peft import PeftModel
from trl.trainer.utils import RepeatSampler

logger = logging.getLogger(__name__)


def is_full_model_checkpoint(folder: str | Path) -> bool:
    """True when ``folder`` holds full-model safetensors weights (one file or an index of shards)."""
    from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

    return any((Path(folder) / name).is_file() for name in (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME))


class QwenVLResumeMixin:
    """Put before a transformers ``Trainer`` subclass (``class T(QwenVLResumeMixin, SFTTrainer)``): resuming then
    restores the checkpoint's weights, not only its optimizer and step (see the module docstring)."""

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        model = self.model if model is None else model
        if isinstance(model, PeftModel) or not is_full_model_checkpoint(resume_from_checkpoint):
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            return
        logger.info("loading model weights from %s (with the checkpoint key conversion)", resume_from_checkpoint)
        saved = type(model).from_pretrained(resume_from_checkpoint, dtype=model.dtype)
        model.load_state_dict(saved.state_dict(), strict=True)


class EpochSeededRepeatSampler(RepeatSampler):
    """TRL's ``RepeatSampler`` whose shuffle depends only on the seed and the epoch (see the module docstring)."""

    def set_epoch(self, epoch: int) -> None:
        if self.seed is not None:
            self.generator.manual_seed(self.seed + epoch)


__all__ = ["EpochSeededRepeatSampler", "QwenVLResumeMixin", "is_full_model_checkpoint"]
