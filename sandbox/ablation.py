"""The worker's runner with the language layer switched off: plain ``exec`` with the real builtins, for tests.

The layer-ablation tests (``tests/sandbox/test_ablation.py``) run attacks with the whole Python language (ctypes,
``os``, ``socket``, signals) against the process layer alone, so that each OS layer is proven to hold on its own.
It is reached only through ``Sandbox(_language_layer=False)``, a private keyword: the servers and the CLI build their
``Sandbox`` from named settings and never pass it, and the model's code runs inside the worker, which cannot reach
the parent's constructor.
"""

from __future__ import annotations

import builtins
import contextlib
import io
from typing import Any


class PlainRunner:
    """Same protocol fields as :class:`thyme.sandbox.execution.CodeRunner`, none of its policy."""

    def __init__(self, scratch_dir: str, inputs: dict[str, str]) -> None:
        copies = list(inputs.values())
        self.namespace: dict[str, Any] = {"__builtins__": builtins, "__name__": "__sandbox__",
                                          "image_path": copies[0], "temp_output_dir": scratch_dir + "/"}
        self.input_error: str | None = None
        self.image_size: tuple[int, int] | None = None

    def run(self, code: str) -> dict[str, Any]:
        before = self.namespace.get("processed_path")
        stdout = io.StringIO()
        error = None
        try:
            with contextlib.redirect_stdout(stdout):
                exec(compile(code, "<code>", "exec"), self.namespace)  # noqa: S102 - the point of this runner
        except BaseException as exc:  # noqa: BLE001 - reported back like CodeRunner does
            error = f"Code execution failed: {type(exc).__name__}: {exc}"
        after = self.namespace.get("processed_path")
        changed = after is not None and after is not before
        return {
            "stdout": stdout.getvalue()[:100_000],
            "error": " ".join(error.split()) if error else None,
            "processed_path": (after if isinstance(after, str) else repr(after)[:200]) if changed else None,
            "processed_path_is_str": isinstance(after, str),
            "repairs": [],
        }
