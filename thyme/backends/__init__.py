"""Model backends behind one small interface (:class:`~thyme.backends.base.Backend`).

``BACKENDS`` maps a CLI name to the backend class. The heavy ones (torch, transformers, openai) are imported only
when their name is looked up, so ``import thyme.backends`` stays light.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping

from thyme.backends.base import Backend, Generation, SamplingParams

# name -> "module:Class"; a plain table, not a plugin system.
_BACKEND_PATHS = {
    "transformers": "thyme.backends.local:TransformersBackend",
    "vllm": "thyme.backends.vllm_engine:VLLMBackend",
    "openai": "thyme.backends.openai_compat:OpenAIBackend",
    "scripted": "thyme.backends.scripted:ScriptedBackend",
}


class _LazyBackends(Mapping):
    """A read-only name -> class mapping that imports a backend's module on first lookup."""

    def __getitem__(self, name: str) -> type:
        try:
            module_name, class_name = _BACKEND_PATHS[name].split(":")
        except KeyError:
            raise KeyError(f"unknown backend {name!r}; choose one of {sorted(_BACKEND_PATHS)}") from None
        return getattr(importlib.import_module(module_name), class_name)

    def __iter__(self) -> Iterator[str]:
        return iter(_BACKEND_PATHS)

    def __len__(self) -> int:
        return len(_BACKEND_PATHS)


BACKENDS: Mapping[str, type] = _LazyBackends()

__all__ = ["BACKENDS", "Backend", "Generation", "SamplingParams"]
