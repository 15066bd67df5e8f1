"""Run by every Python process started with this directory on PYTHONPATH (vLLM's spawned engine processes on CPU).

:func:`thyme.backends.cpu_torch_extensions.repair_cpu_torch_extensions` puts the directory there only when the
install has CUDA builds of torchvision/torchaudio/torchcodec beside a CPU torch; each new interpreter then repairs
the same imports before vLLM's code runs. A ``sitecustomize`` further down ``sys.path`` still runs afterwards.
"""

import importlib.machinery
import importlib.util
import sys
from pathlib import Path

from thyme.backends.cpu_torch_extensions import repair_cpu_torch_extensions

repair_cpu_torch_extensions()

_here = str(Path(__file__).resolve().parent)
_spec = importlib.machinery.PathFinder.find_spec(
    "sitecustomize", [path for path in sys.path if str(Path(path or ".").resolve()) != _here]
)
if _spec is not None and _spec.loader is not None:
    _module = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_module)
