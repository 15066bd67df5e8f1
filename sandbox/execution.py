"""One session's interpreter state inside the worker: repair, compile, run, and report what happened.

The reply is plain data (JSON-ready): the parent never unpickles anything a worker sends, because a worker that the
code took over could send a malicious pickle.
"""

from __future__ import annotations

import os
from typing import Any

from thyme.sandbox import audit
from thyme.sandbox.errors import PolicyViolation
from thyme.sandbox.facades import PathPolicy, build_modules, confined_open, cv2_path_constructors
from thyme.sandbox.limits import Limits
from thyme.sandbox.policy import PrintCollector, compile_code, make_globals
from thyme.sandbox.repair import RepairConfig, RepairContext, repair_source

PRESEEDED_MODULES = {"os": "os", "random": "random", "string": "string", "math": "math", "json": "json", "re": "re",
                     "cv2": "cv2", "np": "numpy", "numpy": "numpy"}
"""Names the original put in the namespace before the code ran (reference 2.3); the weights rely on some."""

cv2_path_constructors()  # computed here, during the worker's warm imports, while OpenCV's stubs are still readable


class CodeRunner:
    """The namespace of one conversation: variables and imports persist from one ``run`` to the next.

    Args:
        scratch_dir (`str`): the session's writable dir, already the process's cwd.
        inputs (`dict[str, str]`): original path -> read-only copy, in the order the caller gave them.
        repairs (`RepairConfig`): which source repairs run.
        limits (`Limits`): stdout cap and pixel limit.
    """

    def __init__(self, scratch_dir: str, inputs: dict[str, str], repairs: RepairConfig, limits: Limits) -> None:
        self.repairs = repairs
        self.copies = list(inputs.values())
        self.paths = PathPolicy(scratch_dir, inputs, limits.max_pixels, limits.scratch_mb * 1024 * 1024)
        modules = build_modules(self.paths)
        self.collector = PrintCollector(limits.max_stdout_chars)
        self.namespace = make_globals(self.paths, modules, self.collector, confined_open(self.paths))
        for name, module in PRESEEDED_MODULES.items():
            self.namespace[name] = modules[module]
        image_module = modules["PIL"].Image
        self.namespace.update(Image=image_module, UnidentifiedImageError=image_module.UnidentifiedImageError,
                              image_path=self.copies[0], temp_output_dir=self.paths.scratch + "/")
        self.input_error, self.image_size = self._inspect_inputs()

    def _inspect_inputs(self) -> tuple[str | None, tuple[int, int] | None]:
        """Reads each input's header here, in the worker, so a malicious file is parsed inside the sandbox."""
        from PIL import Image, UnidentifiedImageError

        first_size: tuple[int, int] | None = None
        for copy in self.copies:
            name = os.path.basename(copy)
            try:
                with Image.open(copy) as image:
                    size = image.size
                    image.verify()
            except Image.DecompressionBombError:
                return f"the input image {name!r} has more pixels than the limit of {self.paths.max_pixels}", None
            except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
                return f"the input file {name!r} is not a readable image ({exc})", None
            try:
                self.paths.check_pixels(size[0], size[1], f"the input image {name!r}")
            except PolicyViolation as exc:
                return str(exc), None
            first_size = first_size or size
        return None, first_size

    def run(self, code: str) -> dict[str, Any]:
        """Runs one code block and returns the reply fields (stdout, error, processed_path, repairs)."""
        self.collector.reset()
        before = self.namespace.get("processed_path")
        # Crop boxes are clamped to the input's size only when there is one input: with several, a literal box may
        # belong to any of them, and clamping it to the first would silently cut a valid crop of a larger one.
        image_size = self.image_size if len(self.copies) == 1 else None
        context = RepairContext(input_path=self.copies[0], image_size=image_size,
                                scratch_dir=self.paths.scratch, is_known_file=self._is_known_file)
        notes: list[str] = []
        error = None
        try:
            # Repairs and compiling are inside the try: pathological code (1000 nested brackets) makes `ast` raise
            # RecursionError or MemoryError, which is the code's error, not the worker's.
            source, notes = repair_source(code, self.repairs, context)
            code_object = compile_code(source)
            with audit.armed(self.paths):
                exec(code_object, self.namespace)  # noqa: S102 - compiled under the RestrictedPython policy
        except SyntaxError as exc:
            error = f"Code execution failed due to SyntaxError: {exc}"
        except ImportError as exc:
            error = ("Code execution failed due to ImportError. Ensure all required modules are available and "
                     f"correctly named: {exc}")
        except MemoryError as exc:
            error = "Code execution failed due to MemoryError. The operation likely consumed too much memory"
            error += f": {exc}" if str(exc) else "."
        except BaseException as exc:  # noqa: BLE001 - any failure of the model's code is reported back to it
            error = f"Code execution failed: {_describe_exception(exc)}"
        after = self.namespace.get("processed_path")
        changed = after is not None and after is not before
        return {
            "stdout": self.collector.text(),
            "error": " ".join(error.split()) if error else None,
            "processed_path": (after if isinstance(after, str) else repr(after)[:200]) if changed else None,
            "processed_path_is_str": isinstance(after, str),
            "repairs": notes,
        }

    def _is_known_file(self, path: str) -> bool:
        try:
            return os.path.isfile(self.paths.readable(path))
        except PolicyViolation:
            return False


def _describe_exception(exc: BaseException) -> str:
    text = str(exc)
    if isinstance(exc, KeyError) or not text:
        return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text
