"""Runs the code a Thyme model writes, safely and as the released weights expect.

```python
from thyme.sandbox import Sandbox
with Sandbox(timeout=10) as sb:
    session = sb.session(image="/abs/in.jpg", item_id="17127")
    result = session.run(code)      # result.ok, .stdout, .error, .images
```
Layers (each holds on its own; docs/sandbox.md says what holds where): source repairs (``repair``), the
RestrictedPython policy and library facades (``policy``, ``facades``), a worker process per session with rlimits,
a wall-clock kill, a clean environment (``worker``, ``process``), bubblewrap, Landlock and seccomp around each worker
(``bubblewrap``, ``landlock``, ``seccomp``, ``isolation``), warm workers (``pool``) or a fork server (``zygote``).
This package imports only the standard library, RestrictedPython, numpy, OpenCV and Pillow (and the latter three
only inside workers).
"""

from __future__ import annotations

from thyme.sandbox.errors import (
    InvalidInput,
    IsolationUnavailable,
    SandboxClosed,
    SandboxError,
    WorkerCrashed,
    WorkerError,
)
from thyme.sandbox.isolation import Isolation
from thyme.sandbox.limits import Limits
from thyme.sandbox.local import Sandbox
from thyme.sandbox.repair import RepairConfig
from thyme.sandbox.result import ExecutionResult
from thyme.sandbox.session import Session

__all__ = [
    "ExecutionResult",
    "InvalidInput",
    "Isolation",
    "IsolationUnavailable",
    "Limits",
    "RepairConfig",
    "Sandbox",
    "SandboxClosed",
    "SandboxError",
    "Session",
    "WorkerCrashed",
    "WorkerError",
]
