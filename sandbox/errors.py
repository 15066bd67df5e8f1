"""Errors of the sandbox's infrastructure.

A failure in the *model's* code is never raised: it comes back as ``ExecutionResult.error`` in the original's
``Sandbox for <id>: ...`` form, so the model can read it and correct itself. The classes below are for failures of
the sandbox itself or of its caller, and they are what ``thyme`` prints as one line before exiting with code 1.

```
SandboxError
├── SandboxClosed           the Sandbox or Session was used after close()
├── InvalidInput            the caller passed a missing path, no image, or a bad limit
├── IsolationUnavailable    strict isolation was asked for and bubblewrap cannot run here
└── WorkerError             a worker process could not be started or broke its protocol
    └── WorkerCrashed       a worker died while starting (the pool stops retrying after a few tries)
```
Errors raised *inside* the worker while the model's code runs (refused import or attribute, path outside the
session, image over the pixel limit) are ``PolicyViolation``; they are turned into result text there.
"""

from __future__ import annotations


class SandboxError(Exception):
    """Base class of every error the sandbox raises to its caller."""


class SandboxClosed(SandboxError):
    """The Sandbox or the Session was already closed."""


class InvalidInput(SandboxError, ValueError):
    """The caller gave an argument the sandbox cannot work with (missing image file, bad limit)."""


class IsolationUnavailable(SandboxError):
    """``Isolation(strict=True)`` was asked for, and the strong layer (bubblewrap's namespaces) cannot run here."""


class WorkerError(SandboxError):
    """A worker process could not be started, or it answered something that is not the protocol."""


class WorkerCrashed(WorkerError):
    """A worker process died before it was ready."""


class PolicyViolation(Exception):
    """Raised inside the worker when the model's code reaches for something the policy refuses.

    It deliberately does not derive from :class:`SandboxError`: it never reaches the caller as an exception, only
    as the text of ``ExecutionResult.error``.
    """
