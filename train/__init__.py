"""thyme.train: GRPO-ATS reinforcement learning of Thyme on TRL (``thyme-train``), with sandbox images in the loss.

Heavy names (torch, transformers, trl) load on first use, so ``import thyme.train`` stays cheap for the CLI.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ThymeGRPOConfig": "thyme.train.config",
    "ThymeGRPOTrainer": "thyme.train.trainer",
    "PolicyBackend": "thyme.train.policy",
    "SandboxErrorRateError": "thyme.train.rollout",
    "load_rl_dataset": "thyme.train.data",
    "Judge": "thyme.train.rewards",
    "format_reward": "thyme.train.rewards",
    "make_accuracy_reward": "thyme.train.rewards",
    "make_consistency_reward": "thyme.train.rewards",
    "make_thyme_rewards": "thyme.train.rewards",
    "thyme_reward_weights": "thyme.train.rewards",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'thyme.train' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
