"""Run Thyme inside the two toolkits the field evaluates with, as a thin layer over the agent.

- :mod:`~thyme.evaluation.adapters.vlmevalkit`: ``ThymeVLM``, a VLMEvalKit model class (``BaseModel`` subclass when
  ``vlmeval`` is installed) using Thyme's per-type prompts (reference 1.2);
- :mod:`~thyme.evaluation.adapters.lmms`: ``ThymeLMMs``, an lmms-eval ``lmms`` model (``thyme_agent``), registered
  through lmms-eval's ``lmms_eval.models`` entry-point group.

Both delegate to :class:`~thyme.evaluation.adapters.answerer.ToolkitAnswerer`, which builds the backend from the
keyword arguments these toolkits pass and answers in ``thyme`` or ``direct`` mode. Neither toolkit is a dependency:
each adapter imports its toolkit only when the adapter module itself is imported.
"""
