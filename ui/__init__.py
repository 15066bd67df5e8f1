"""The Thyme demo: a Gradio chat that shows the model reasoning, writing code, getting its crops back and answering.

``import thyme.ui`` stays light: Gradio is imported on first use of :func:`build_demo`
(``pip install 'thyme-vlm[ui]'``).
"""

from __future__ import annotations

from typing import Any

__all__ = ["build_demo"]


def __getattr__(name: str) -> Any:
    if name == "build_demo":
        from thyme.ui.app import build_demo

        return build_demo
    raise AttributeError(f"module 'thyme.ui' has no attribute {name!r}")
