"""Thyme: a multimodal LLM that answers questions about images by writing Python that a sandbox runs.

``import thyme`` stays light (no torch): heavy names are resolved on first use through module ``__getattr__``.
"""

from __future__ import annotations

from thyme.errors import BackendError, ConfigError, ImageError, ModelNotFoundError, ProtocolError, ThymeError

__version__ = "0.1.0"

__all__ = ["BackendError", "ConfigError", "ImageError", "ModelNotFoundError", "ProtocolError", "ThymeError", "__version__"]
