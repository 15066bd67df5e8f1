"""What one code block produced.

The original accepted any printed path that existed, anywhere on disk (``/etc/hostname`` came back as an
"image"), and fell back to globbing the whole shared output dir in file-system order (reference 2.4). Here only
files inside the session's scratch dir are accepted, in the order they were printed, and what comes back is a
checked copy (:mod:`.returned`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class ExecutionResult:
    """The outcome of one ``Session.run``.

    Args:
        ok (`bool`): the code ran to the end and its results were found; ``error`` is ``None``.
        stdout (`str`): what the code printed, capped (the cut is marked at the end).
        error (`str` or `None`): one line in the original's ``Sandbox for <id>: ...`` form, for the model to read.
        images (`list[str]`): absolute paths of the images the code saved, in print order: checked copies in the
            session's ``results_dir`` (the worker cannot change them), named as the code named them.
        repairs (`list[str]`): the source repairs applied, one line each (empty when the code ran as written).
    """

    ok: bool
    stdout: str
    error: str | None = None
    images: list[str] = field(default_factory=list)
    repairs: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        """What goes back to the model when no image was saved: the error, else the stripped stdout."""
        return self.error if self.error is not None else self.stdout.strip()

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (CLI ``--json``, the HTTP server)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExecutionResult:
        return cls(ok=bool(data["ok"]), stdout=str(data["stdout"]), error=data.get("error"),
                   images=list(data.get("images", [])), repairs=list(data.get("repairs", [])))
