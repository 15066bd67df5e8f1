"""Thyme: a multimodal LLM that answers questions about images by writing Python that a sandbox runs.

``import thyme`` stays light (no torch): the agent, the config and the trajectory are resolved on first use through
module ``__getattr__``; the errors are imported at once (they are tiny).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from thyme.errors import BackendError, ConfigError, ImageError, ModelNotFoundError, ProtocolError, ThymeError

if TYPE_CHECKING:
    from thyme.agent import ThymeAgent
    from thyme.config import AgentConfig
    from thyme.loop import RolloutResult
    from thyme.trajectory import Trajectory

__version__ = "0.1.0"

_LAZY = {
    "AgentConfig": "thyme.config",
    "RolloutResult": "thyme.loop",
    "ThymeAgent": "thyme.agent",
    "Trajectory": "thyme.trajectory",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'thyme' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "AgentConfig",
    "BackendError",
    "ConfigError",
    "ImageError",
    "ModelNotFoundError",
    "ProtocolError",
    "RolloutResult",
    "ThymeAgent",
    "ThymeError",
    "Trajectory",
    "__version__",
]
