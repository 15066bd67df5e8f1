"""Benchmarking Thyme the way the field does: VLMEvalKit/JSONL data, rule matching, tool-use metrics, reports.

Modules: :mod:`~thyme.evaluation.datasets` (TSV/JSONL readers), :mod:`~thyme.evaluation.matching` (VLMEvalKit-style
answer rules), :mod:`~thyme.evaluation.predictions` (the resumable ``predictions.jsonl``),
:mod:`~thyme.evaluation.metrics`, :mod:`~thyme.evaluation.harness` (runs a model over a dataset, with or without the
tool loop), :mod:`~thyme.evaluation.report` (``results.json``, ``report.md``, run comparison),
:mod:`~thyme.evaluation.synth` (offline V*-style data) and :mod:`~thyme.evaluation.adapters` (VLMEvalKit and
lmms-eval model classes). User guide: ``docs/eval.md``.
"""
