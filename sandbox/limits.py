"""Resource limits of one worker process and of the code it runs."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from thyme.sandbox.errors import InvalidInput

DEFAULT_TIMEOUT_S = 10.0
"""Wall-clock seconds per code block; the original's timeout_decorator also allowed 10 s."""

DEFAULT_MAX_PIXELS = 64_000_000
"""Largest image (input, read or written) in pixels: an 8K frame fits, a decompression bomb does not."""


@dataclass(frozen=True)
class Limits:
    """What one code block may consume. The parent enforces the wall clock; the worker applies the rest as rlimits.

    Args:
        timeout_s (`float`, defaults to `10.0`): wall-clock seconds per ``run``; past it the parent kills the worker.
        cpu_s (`float` or `None`, defaults to `None`): CPU seconds per ``run`` (RLIMIT_CPU); ``None`` means
            ``timeout_s + 1``, a backstop for the wall clock.
        memory_mb (`int`, defaults to `2048`): address space of the worker (RLIMIT_AS). The warm imports of
            cv2/numpy/PIL alone take about 470 MiB of it.
        file_size_mb (`int`, defaults to `256`): largest file the worker may write (RLIMIT_FSIZE).
        open_files (`int`, defaults to `64`): file descriptors the worker may hold (RLIMIT_NOFILE).
        max_stdout_chars (`int`, defaults to `20000`): printed text kept per ``run``; the rest is cut and counted.
        max_pixels (`int`, defaults to `64000000`): largest input, read or written image in pixels.
        scratch_mb (`int`, defaults to `1024`): opening a file for writing is refused once the session's scratch
            dir holds this much (each file is also capped by ``file_size_mb``).
    """

    timeout_s: float = DEFAULT_TIMEOUT_S
    cpu_s: float | None = None
    memory_mb: int = 2048
    file_size_mb: int = 256
    open_files: int = 64
    max_stdout_chars: int = 20_000
    max_pixels: int = DEFAULT_MAX_PIXELS
    scratch_mb: int = 1024

    def __post_init__(self) -> None:
        if self.timeout_s <= 0:
            raise InvalidInput(f"timeout_s ({self.timeout_s}) must be > 0 seconds")
        if self.cpu_s is not None and self.cpu_s <= 0:
            raise InvalidInput(f"cpu_s ({self.cpu_s}) must be > 0 seconds, or None to follow timeout_s")
        if self.memory_mb < 768:
            raise InvalidInput(f"memory_mb ({self.memory_mb}) is below 768: the warm cv2/numpy/PIL imports need it")
        for name in ("file_size_mb", "open_files", "max_stdout_chars", "max_pixels", "scratch_mb"):
            if getattr(self, name) <= 0:
                raise InvalidInput(f"{name} ({getattr(self, name)}) must be > 0")

    @property
    def cpu_seconds(self) -> int:
        """The CPU budget per run, in whole seconds as RLIMIT_CPU counts them."""
        return int(self.cpu_s if self.cpu_s is not None else self.timeout_s + 1) + 1

    def to_dict(self) -> dict[str, float | int | None]:
        return asdict(self)
