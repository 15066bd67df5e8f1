"""Which OS layers a ``Sandbox`` puts around its workers, and how it reports what it got.

The strong layer is bubblewrap's namespaces: the worker sees no host file, no other process and no network at all.
Landlock, seccomp, the uid drop and the rlimits hold as well where bubblewrap cannot run (not installed, or a
non-root user on a system that forbids unprivileged user namespaces), but there the host is merely refused rather
than absent: one kernel mechanism (Landlock's path rules, seccomp's socket rule) stands between the code and each
host file, process or socket, and an older kernel has fewer of them. So the report says ``weak`` and a warning is
logged. ``strict=True`` refuses to start without the strong layer.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from thyme.sandbox import bubblewrap
from thyme.sandbox.errors import IsolationUnavailable

logger = logging.getLogger(__name__)

STRICT_ENV = "THYME_SANDBOX_STRICT"
"""``THYME_SANDBOX_STRICT=1`` makes strict the default, for servers started by a command line."""

LAYER_KEYS = ("namespaces", "network", "files", "landlock", "seccomp", "user", "no_new_privs", "rlimits")


def _strict_default() -> bool:
    return os.environ.get(STRICT_ENV, "") == "1"


@dataclass(frozen=True)
class Isolation:
    """The OS layers of a local Sandbox (all on by default; each switch exists to measure or prove the others).

    Args:
        strict (`bool`, defaults to ``THYME_SANDBOX_STRICT=1`` in the environment, else `False`): refuse to run
            (``IsolationUnavailable``) unless bubblewrap's namespaces hold.
        bubblewrap (`bool`, defaults to `True`): start workers inside bubblewrap when it can run here.
        landlock (`bool`, defaults to `True`): confine each worker with Landlock where the kernel has it.
        seccomp (`bool`, defaults to `True`): load the worker's seccomp filter where libseccomp is installed.
    """

    strict: bool = field(default_factory=_strict_default)
    bubblewrap: bool = True
    landlock: bool = True
    seccomp: bool = True

    def check(self) -> str | None:
        """Says why bubblewrap will not be used (None when it will); raises in strict mode.

        Raises:
            IsolationUnavailable: ``strict`` and bubblewrap cannot run here, or was switched off.
        """
        problem = "bubblewrap is switched off (Isolation(bubblewrap=False))" if not self.bubblewrap else (
            bubblewrap.probe())
        if problem is not None and self.strict:
            raise IsolationUnavailable(
                f"strict isolation refused to start: {problem}. Install bubblewrap (apt-get install bubblewrap), "
                f"allow unprivileged user namespaces or run as root, or drop strict=True / {STRICT_ENV}=1 to "
                "accept the weaker layers (Sandbox.isolation lists them)")
        return problem


def summarize(report: dict[str, str], weak_reason: str | None) -> dict[str, str]:
    """Adds ``level`` (``strong`` or ``weak``) and, when weak, ``warning`` to a worker's per-layer report."""
    summary = {key: str(report[key]) for key in LAYER_KEYS if key in report}
    if weak_reason is None and summary.get("namespaces", "").startswith("bubblewrap"):
        summary["level"] = "strong"
    else:
        summary["level"] = "weak"
        summary["warning"] = (
            f"WEAK SANDBOX ISOLATION: {weak_reason or 'bubblewrap did not hold'}. Code that escapes the language "
            "layer is held only by Landlock, seccomp, the uid and the rlimits (see docs/sandbox.md); pass "
            "Isolation(strict=True) to refuse running like this")
    return summary
