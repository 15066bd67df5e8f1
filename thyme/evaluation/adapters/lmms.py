"""Thyme as an lmms-eval model (``--model thyme_agent``), for users whose pipeline is lmms-eval.

lmms-eval already ships a port of the original loop (``--model thyme``, reference 1.1), with that loop's defects
(KV-cache reuse hiding sandbox images, errors never shown to the model, in-process exec). This wrapper runs our agent
instead::

    pip install lmms-eval   # then, with thyme installed (its entry point registers ``thyme_agent``):
    lmms_eval --model thyme_agent --model_args model_path=Kwai-Keye/Thyme-RL --tasks vstar_bench --batch_size 1
    lmms_eval --model thyme_agent --model_args endpoint=http://127.0.0.1:8000/v1,mode=direct --tasks hrbench

``--model_args`` are the keyword arguments of
:class:`~thyme.evaluation.adapters.answerer.ToolkitAnswerer` (``model_path`` or ``endpoint``, ``model_name``,
``mode``, ``device``, ``dtype``, AgentConfig fields). The task's prompt (its pre/post prompt text) is used as the
question, as lmms-eval does for every model, and the content of ``<answer>`` is returned for the task's scorer.
Only ``generate_until`` is supported: Thyme is a generation-time tool loop and has no log-likelihood scoring.

Status: checked against lmms-eval 0.7.3's ``lmms`` base class and ``Instance`` (imported from the wheel with
``--no-deps``); the full ``lmms_eval`` CLI was not run here, its dependencies being too heavy for this machine.
"""

from __future__ import annotations

import logging
from typing import Any

from thyme.evaluation.adapters.answerer import ToolkitAnswerer

try:
    from lmms_eval.api.instance import Instance
    from lmms_eval.api.model import lmms
except ImportError as exc:  # pragma: no cover - exercised only without lmms-eval
    raise ImportError("lmms-eval is not installed: `pip install lmms-eval` to use the thyme_agent model") from exc

logger = logging.getLogger(__name__)

MODEL_ID = "thyme_agent"


class ThymeLMMs(lmms):
    """lmms-eval model running the Thyme agent; see the module docstring for the arguments."""

    def __init__(self, batch_size: int | str = 1, **kwargs: Any) -> None:
        super().__init__()
        if int(batch_size) != 1:
            logger.warning("thyme_agent answers one sample at a time; batch_size=%s is ignored", batch_size)
        self.answerer = ToolkitAnswerer(**kwargs)

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Answers each request: ``args = (context, gen_kwargs, doc_to_visual, doc_id, task, split)``."""
        from tqdm.auto import tqdm

        answers = []
        for request in tqdm(requests, desc="thyme_agent", disable=self.rank != 0):
            context, _gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            visuals = [v for v in doc_to_visual(self.task_dict[task][split][doc_id]) if v is not None]
            if not visuals:
                raise ValueError(
                    f"{task}/{split} doc {doc_id} has no image: thyme_agent answers questions about images"
                )
            images = visuals if len(visuals) > 1 else visuals[0]
            answers.append(self.answerer.answer(images, context, item_id=f"{task}-{doc_id}"))
        return answers

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError(
            "thyme_agent generates answers with a tool loop; log-likelihood tasks are unsupported"
        )

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("thyme_agent answers single-round questions; multi-round tasks are unsupported")


def lmms_eval_manifest() -> Any:
    """The ``lmms_eval.models`` entry point: tells lmms-eval where ``thyme_agent`` lives without importing it."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.ThymeLMMs")
