"""``thyme serve``: the whole Thyme agent (model + loop + sandbox) behind an OpenAI-compatible chat endpoint.

Chat front-ends, VLMEvalKit's and lmms-eval's API model wrappers and application code written against the ``openai``
SDK reach vision models through ``POST /v1/chat/completions``. This package puts the agent there: a request's
images and question go through :func:`thyme.loop.run_rollout`, the completion's ``content`` is the final answer (so
an unmodified client works), and the trajectory (reasoning, code, sandbox output, crops as URLs on this server)
rides along in the extra ``thyme`` field. See docs/serve.md for the API.

FastAPI and uvicorn are imported by :mod:`thyme.serve.app` only (the ``server`` extra).
"""
