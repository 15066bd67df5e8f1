"""Thyme as a VLMEvalKit model, for users whose pipeline is VLMEvalKit (the toolkit the paper's numbers came from).

Register it in VLMEvalKit's ``vlmeval/config.py`` (VLMEvalKit has no plugin mechanism; models are entries of the
``supported_VLM`` dict)::

    from functools import partial
    from thyme.evaluation.adapters.vlmevalkit import ThymeVLM
    supported_VLM["Thyme-RL-agent"] = partial(ThymeVLM, model_path="Kwai-Keye/Thyme-RL")
    supported_VLM["Thyme-RL-direct"] = partial(ThymeVLM, model_path="Kwai-Keye/Thyme-RL", mode="direct")

then ``python run.py --data HRBench4K VStarBench --model Thyme-RL-agent``. Prompts follow VLMEvalKit's Thyme mixin
(reference 1.2): multiple choice with the option list and instruction line, yes/no with " Please answer yes or no."
(not for MME), short answers with the short-answer line (not for MMVet); other dataset types use VLMEvalKit's own
prompts. The returned text is the content of ``<answer>``, which VLMEvalKit's matcher maps to an option letter.

Status: VLMEvalKit is not on PyPI (it installs from its git repository). EvalScope's packaged fork ``ms-vlmeval``
(0.0.20) is, but importing ``vlmeval`` pulls in torchvision, which cannot be installed on the CPU machine this was
written on. So this class is tested only through its toolkit-independent parts (prompt building and
``generate_inner``), not inside VLMEvalKit itself.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from thyme.evaluation.adapters.answerer import ToolkitAnswerer
from thyme.evaluation.datasets import OPTION_LETTERS
from thyme.evaluation.harness import format_by_type

try:
    from vlmeval.vlm.base import BaseModel as _VLMEvalKitBase

    HAS_VLMEVAL = True
except ImportError:  # the class stays usable (and testable) without VLMEvalKit; build_prompt then explains
    _VLMEvalKitBase = object
    HAS_VLMEVAL = False

VLMEVAL_INSTALL_HINT = (
    "VLMEvalKit is not installed: `git clone https://github.com/open-compass/VLMEvalKit && pip install -e VLMEvalKit`"
)
# VLMEvalKit dataset type -> our question type.
_TYPES = {"MCQ": "mcq", "Y/N": "yes_no", "VQA": "vqa"}
# Datasets whose Thyme prompt leaves the instruction line off (reference 1.2): MME (yes/no) and MMVet (short answer).
_NO_INSTRUCTION_EXACT = "MME"
_NO_INSTRUCTION_PREFIX = "MMVet"


def _present(value: Any) -> bool:
    """False for the NaN/None pandas puts in empty TSV cells."""
    return value is not None and not (isinstance(value, float) and math.isnan(value)) and str(value) != ""


def build_question(line: Mapping[str, Any], dataset_type: str, dataset: str) -> str:
    """The Thyme prompt text for one VLMEvalKit row (a ``pandas.Series`` or a dict).

    Args:
        line: the row: ``question``, options ``A``..``E``, optional ``hint``.
        dataset_type: VLMEvalKit's ``DATASET_TYPE(dataset)`` (``MCQ``, ``Y/N``, ``VQA``).
        dataset: the dataset name (MME and MMVet get no instruction line).
    """
    kind = _TYPES[dataset_type]
    options = {c: str(line[c]) for c in OPTION_LETTERS if c in line and _present(line[c])}
    hint = str(line["hint"]) if "hint" in line and _present(line["hint"]) else None
    instruction = dataset != _NO_INSTRUCTION_EXACT and not dataset.startswith(_NO_INSTRUCTION_PREFIX)
    return format_by_type(kind, str(line["question"]), options, hint, instruction=instruction)


class ThymeVLM(_VLMEvalKitBase):  # type: ignore[misc, valid-type]
    """A VLMEvalKit model that answers with the Thyme agent (``mode="thyme"``) or directly (``mode="direct"``).

    Args:
        **kwargs: see :class:`~thyme.evaluation.adapters.answerer.ToolkitAnswerer` (``model_path`` or
            ``endpoint``, ``mode``, AgentConfig fields such as ``max_generation_calls``).
    """

    INTERLEAVE = False

    def __init__(self, **kwargs: Any) -> None:
        self.answerer = ToolkitAnswerer(**kwargs)

    def use_custom_prompt(self, dataset: str) -> bool:
        """Thyme formats MCQ, yes/no and short-answer prompts itself; everything else keeps VLMEvalKit's prompt."""
        return _dataset_type(dataset) in _TYPES

    def build_prompt(self, line: Any, dataset: str) -> list[dict[str, str]]:
        """VLMEvalKit's multimodal message for a row: the image path(s), then Thyme's formatted question."""
        if not HAS_VLMEVAL:
            raise ImportError(VLMEVAL_INSTALL_HINT)
        paths = self.dump_image(line, dataset)
        text = build_question(line, _dataset_type(dataset), dataset)
        return [*({"type": "image", "value": p} for p in paths), {"type": "text", "value": text}]

    def generate_inner(self, message: list[dict[str, str]], dataset: str | None = None) -> str:
        """Answers one VLMEvalKit message; several images all go to the model and the sandbox."""
        images = [item["value"] for item in message if item["type"] == "image"]
        text = "\n".join(item["value"] for item in message if item["type"] == "text")
        if not images:
            raise ValueError("Thyme needs an image: the message has none")
        return self.answerer.answer(images if len(images) > 1 else images[0], text)


def _dataset_type(dataset: str) -> str | None:
    if not HAS_VLMEVAL:
        return None
    from vlmeval.dataset import DATASET_TYPE

    return DATASET_TYPE(dataset)
