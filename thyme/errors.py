"""Errors raised by Thyme's core (agent, backends, protocol, images, config).

    ThymeError
    ├── ConfigError(ValueError)      a setting or CLI flag has a bad value
    ├── ImageError(ValueError)       an input image is missing, corrupt, not an image or too large
    ├── ProtocolError(ValueError)    model text or a trajectory does not follow the Thyme format
    └── BackendError(RuntimeError)   a model backend failed (server unreachable, HTTP error, load failure)
        └── ModelNotFoundError       weights cannot be found locally nor downloaded

A failure of the *model's code* is not here: the sandbox returns it as data (``ExecutionResult.error``) so the model
can read it and correct itself. Sandbox infrastructure errors live in ``thyme.sandbox.errors`` because the sandbox
imports nothing from the core.
"""

from __future__ import annotations


class ThymeError(Exception):
    """Base class of every error Thyme's core raises on purpose."""


class ConfigError(ThymeError, ValueError):
    """A configuration value or command-line flag is invalid; the message names the value and the fix."""


class ImageError(ThymeError, ValueError):
    """An input image cannot be used (missing, unreadable, not an image, too many pixels)."""


class ProtocolError(ThymeError, ValueError):
    """Text or data does not follow the Thyme message format."""


class BackendError(ThymeError, RuntimeError):
    """A model backend failed; the message carries the URL or path and the cause."""


class ModelNotFoundError(BackendError):
    """Model weights could not be found at the given path or downloaded from the hub."""


__all__ = ["BackendError", "ConfigError", "ImageError", "ModelNotFoundError", "ProtocolError", "ThymeError"]
