"""Counters and latency percentiles of the sandbox tool server, for ``GET /metrics``.

Written by hand rather than with ``prometheus_client``: the server needs a handful of numbers, and one more
dependency for them would be heavier than the class below. The snapshot is JSON, easy to read from a rollout
driver. Process figures (RSS, live workers) come from psutil.
"""

from __future__ import annotations

import collections
import math
import threading
import time

LATENCY_WINDOW = 2048  # recent runs kept for the percentiles: enough for a stable p99, small enough to sort per call
PERCENTILES = (50, 90, 99)
WORKER_MODULE = "thyme.sandbox.worker"  # the ``-m`` module of every worker command line (see process.py)


def process_rss_bytes() -> int:
    """Returns the resident memory of this process now (``resource.getrusage`` only gives the peak, which cannot
    show whether memory comes back after a load)."""
    import psutil

    return int(psutil.Process().memory_info().rss)


def count_workers_alive() -> int:
    """Counts the live sandbox worker processes started by this process (warm ones and those held by sessions).

    The pool does not expose this, and a worker can die under a session without the pool knowing until the next
    run, so the process table is the ground truth.
    """
    import psutil

    alive = 0
    for child in psutil.Process().children():
        try:
            if WORKER_MODULE in child.cmdline() and child.status() != psutil.STATUS_ZOMBIE:
                alive += 1
        except psutil.Error:  # exited between listing and inspecting
            continue
    return alive


def _percentile(sorted_values: list[float], percent: int) -> float:
    """Nearest-rank percentile of an already sorted, non-empty list."""
    rank = max(0, min(len(sorted_values) - 1, math.ceil(percent / 100 * len(sorted_values)) - 1))
    return sorted_values[rank]


class ServerMetrics:
    """Thread-safe counters: runs, failed runs, errors by kind, queue length, run latency.

    Error kinds are the names the API answers with (``busy``, ``unauthorized``, ``request_too_large``, ...) plus
    ``code_error`` for runs whose code failed (``ok=False``): those are the model's errors, counted but not the
    server's fault.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._started = time.monotonic()
        self.runs = 0
        self.sessions_opened = 0
        self.queue_length = 0
        self.errors: collections.Counter[str] = collections.Counter()
        self._latencies_ms: collections.deque[float] = collections.deque(maxlen=LATENCY_WINDOW)

    def record_run(self, duration_s: float, ok: bool) -> None:
        """Counts one finished run and its wall-clock duration."""
        with self._lock:
            self.runs += 1
            self._latencies_ms.append(duration_s * 1000.0)
            if not ok:
                self.errors["code_error"] += 1

    def record_error(self, kind: str) -> None:
        """Counts one refused or failed request of the given kind."""
        with self._lock:
            self.errors[kind] += 1

    def record_session_opened(self) -> None:
        with self._lock:
            self.sessions_opened += 1

    def change_queue(self, delta: int) -> None:
        """Adds ``delta`` (+1 or -1) to the number of requests waiting for a session slot."""
        with self._lock:
            self.queue_length += delta

    def snapshot(self) -> dict[str, object]:
        """Returns the counters as a JSON-ready dict (latencies in milliseconds over the last runs)."""
        with self._lock:
            latencies = sorted(self._latencies_ms)
            return {
                "uptime_s": round(time.monotonic() - self._started, 3),
                "runs": self.runs,
                "sessions_opened": self.sessions_opened,
                "queue_length": self.queue_length,
                "errors": dict(self.errors),
                "latency_ms": {
                    f"p{p}": (round(_percentile(latencies, p), 3) if latencies else None) for p in PERCENTILES
                },
                "latency_window": len(latencies),
                "rss_bytes": process_rss_bytes(),
            }
