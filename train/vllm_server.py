"""``vllm_mode: server``: the vLLM server runs on its own GPUs; every trainer process sends its own rollouts' calls.

The protocol is TRL 1.16's (``trl.generation.vllm_client``): the server is ``vllm serve MODEL --enable-scale-out
--weight-transfer-config '{"backend": "nccl"}'`` with ``VLLM_SERVER_DEV_MODE=1``. Images are rendered to features by
``/v1/chat/completions/render`` (the server's own image processor), the features are pointed at the image-token
runs of the trainer's ids, and ``/inference/v1/generate`` generates from those ids, so the request is token-exact as
in colocate mode. What differs from TRL's server path, and why:

- TRL gathers every process's prompts on the main process and sends one batch with one sampling setting. A Thyme
  rollout's next call exists only after its sandbox ran, and prose and code sample differently, so EVERY process
  sends each call on its own (rollout threads, one HTTP request per call); the server batches them.
- The server must run with ``--logprobs-mode raw_logprobs`` (TRL recommends ``processed_logprobs``; see
  :mod:`thyme.train.vllm_rollout` for why raw is what the loss computes). :meth:`ServerRollouts.connect` checks it.
- Weights: TRL's ``VLLMGeneration`` in server mode, unchanged: after each optimizer step the main process streams
  every parameter over the NCCL weight-transfer group (``/init_weight_transfer_engine``, ``/update_weights``). It
  needs CUDA on the trainer side; on a CPU-only trainer it stops with TRL's NotImplementedError.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from thyme.backends.base import FINISH_EOS, FINISH_LENGTH, FINISH_STOP, SamplingParams
from thyme.errors import BackendError, ConfigError
from thyme.train.vllm_rollout import VLLMPolicyBackend

logger = logging.getLogger(__name__)

RAW_LOGPROBS = "raw_logprobs"


def image_runs(ids: list[int], pad_id: int) -> list[dict[str, int]]:
    """``[{"offset", "length"}]`` of each run of image-pad tokens in ``ids``."""
    runs, index = [], 0
    while index < len(ids):
        if ids[index] != pad_id:
            index += 1
            continue
        start = index
        while index < len(ids) and ids[index] == pad_id:
            index += 1
        runs.append({"offset": start, "length": index - start})
    return runs


def place_features(features: dict, ids: list[int], pad_id: int) -> dict:
    """Points the server's image features at the image-token runs of ``ids`` (TRL's ``_place_features``, plus a check).

    Raises:
        BackendError: a run's length is not the server's token count for that image (its pixel limits differ).
    """
    runs = image_runs(ids, pad_id)
    rendered = features["mm_placeholders"]["image"]
    lengths = [run["length"] for run in runs]
    if lengths != [int(item["length"]) for item in rendered]:
        raise BackendError(
            f"the vLLM server renders the images to {[int(item['length']) for item in rendered]} tokens where the "
            f"trainer's processor made {lengths}: start the server with the trainer's min_pixels/max_pixels "
            "(--mm-processor-kwargs)"
        )
    return {**features, "mm_placeholders": {**features["mm_placeholders"], "image": runs}}


def server_sampling_params(
    sampling: SamplingParams, stop: list[str] | tuple[str, ...], max_tokens: int, suppress_ids: list[int]
) -> dict[str, Any]:
    """The JSON ``sampling_params`` of one call: those of :func:`~thyme.train.vllm_rollout.vllm_sampling_params`."""
    greedy = sampling.greedy
    params = {
        "n": 1,
        "temperature": 0.0 if greedy else sampling.temperature,
        "top_p": 1.0 if greedy else sampling.top_p,
        "top_k": 0 if greedy else sampling.top_k,
        "min_p": 0.0,
        "repetition_penalty": sampling.repetition_penalty,
        "max_tokens": max_tokens,
        "stop": list(stop),
        "include_stop_str_in_output": True,
        "logprobs": 0,
        "logit_bias": {str(token): -100.0 for token in suppress_ids},
        "skip_special_tokens": True,
        "output_kind": 2,  # FINAL_ONLY (TRL's note: the default drops finished sequences)
    }
    if sampling.seed is not None:
        params["seed"] = sampling.seed
    return params


class ServerClient:
    """One trainer process's connection to the vLLM server (TRL's ``VLLMClient`` for the session and rendering)."""

    def __init__(self, base_url: str, timeout_s: float = 240.0) -> None:
        from trl.generation.vllm_client import VLLMClient

        self._client = VLLMClient(base_url=base_url, connection_timeout=timeout_s)
        self.base_url = self._client.base_url

    def logprobs_mode(self) -> str:
        return self._client.get_server_info()["model_config"]["logprobs_mode"]

    def generate(self, ids: list[int], images: list, params: dict[str, Any], pad_id: int) -> dict:
        """One ``/inference/v1/generate`` request from ``ids`` (image tokens expanded) and their images."""
        body: dict[str, Any] = {
            "request_id": f"thyme-{uuid.uuid4().hex}",
            "model": self._client.model,
            "token_ids": ids,
            "sampling_params": params,
        }
        if images:
            features = self._client.image_features([list(images)])[0]
            body["features"] = place_features(features, ids, pad_id)
        return self._client._post(f"{self.base_url}/inference/v1/generate", json=body)

    def close(self) -> None:
        self._client.session.close()


def _choice_logprobs(choice: dict, new_ids: list[int]) -> list[float]:
    """The sampled tokens' log-probs of a ``/inference/v1/generate`` choice (``content[i]`` = token ``i``)."""
    content = (choice.get("logprobs") or {}).get("content")
    if content is None or [int(entry["token_id"]) for entry in content] != new_ids:
        raise BackendError("the vLLM server returned no log-prob per sampled token: it must honour logprobs=0")
    return [float(entry["logprob"]) for entry in content]


class VLLMServerPolicyBackend(VLLMPolicyBackend):
    """:class:`~thyme.train.vllm_rollout.VLLMPolicyBackend` whose requests go to a vLLM server over HTTP."""

    def _sample(self, stop, sampling: SamplingParams, budget: int):
        tokens = self.tokens
        ids = tokens.prompt_ids + tokens.completion_ids
        params = server_sampling_params(sampling, stop, budget, self._suppress)
        choice = self._engine.generate(ids, tokens.images, params, self._pad_id)["choices"][0]
        new_ids = [int(token) for token in choice["token_ids"]]
        logprobs = _choice_logprobs(choice, new_ids)
        if choice.get("finish_reason") == "length":
            finish = FINISH_LENGTH
        elif isinstance(choice.get("stop_reason"), str):
            finish = FINISH_STOP
        else:
            finish = FINISH_EOS
        return self._finish_call(new_ids, logprobs, stop, finish)

    def _score(self, ids: list[int]) -> list[float]:
        tokens = self.tokens
        full = tokens.prompt_ids + tokens.completion_ids + list(ids)
        params = {"max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 0, "output_kind": 2}
        response = self._engine.generate(full, tokens.images, params, self._pad_id)
        scored = response["prompt_logprobs"][len(full) - len(ids) :]
        return [float(entry[str(token)]["logprob"]) for token, entry in zip(ids, scored, strict=True)]


class ServerRollouts:
    """The server-mode rollout engine of one trainer process: its HTTP client and TRL's weight sync."""

    def __init__(self, generation: Any, client: ServerClient) -> None:
        self.generation = generation
        self.client = client

    @classmethod
    def connect(cls, trainer: Any) -> ServerRollouts:
        """Connects every process to the server (main process: also TRL's NCCL weight-transfer group).

        Raises:
            ConfigError: the server reports another ``logprobs_mode`` than ``raw_logprobs``.
        """
        from trl.generation.vllm_generation import VLLMGeneration

        args = trainer.args
        base_url = args.vllm_server_base_url or f"http://{args.vllm_server_host}:{args.vllm_server_port}"
        client = ServerClient(base_url, args.vllm_server_timeout)
        mode = client.logprobs_mode()
        if mode != RAW_LOGPROBS:
            raise ConfigError(
                f"the vLLM server at {base_url} runs with --logprobs-mode {mode}: Thyme's rollouts need "
                f"{RAW_LOGPROBS} (the temperature-1 log-probs the loss computes); restart it with "
                f"--logprobs-mode {RAW_LOGPROBS}"
            )
        generation = VLLMGeneration(
            trainer.model,
            trainer.accelerator,
            trainer.processing_class,
            mode="server",
            server_base_url=base_url,
            group_port=args.vllm_group_port,
            server_timeout=args.vllm_server_timeout,
        )
        return cls(generation, client)

    def backend(self, processor: Any, **options: Any) -> VLLMServerPolicyBackend:
        return VLLMServerPolicyBackend(self.client, processor, **options)

    def close(self) -> None:
        self.client.close()
