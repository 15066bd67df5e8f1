"""GRPO-ATS rollouts on vLLM: every generation call of a batch is one engine request, all of them in flight at once.

The transformers path (:class:`~thyme.train.policy.PolicyBackend`) runs the batch's rollouts in threads but takes one
lock for every ``model.generate``, so generation is sequential. Here each rollout thread hands its call to a
:class:`VLLMEngineDriver`, whose single thread owns the engine: it adds every pending request, steps the engine, and
returns each finished request to the thread waiting on it. So while one rollout waits for its code in the sandbox,
the calls of all the others decode together in vLLM's continuous batch.

The bookkeeping is the transformers path's, unchanged (:class:`VLLMPolicyBackend` only replaces the sampling step):
the trajectory's token ids are kept, only what the loop appends is tokenised, and each request carries exactly
those ids plus the trajectory's images, so the loss scores exactly the sampled tokens. Two things vLLM needs:

- **Image tokens collapsed.** Given token ids with the image already expanded (N ``<|image_pad|>``), vLLM 0.32
  expands the first pad again (measured: 104 prompt ids became 175), so every token after the image gets the wrong
  position. Each run of pads is sent as one pad and vLLM expands it with its own image processor; the expanded ids it
  reports must equal the trainer's, which proves both resized the image to the same grid (else the request fails
  with a message naming ``min_pixels``/``max_pixels``).
- **Raw log-probs.** The engine runs with ``logprobs_mode="raw_logprobs"``: log-softmax of the model's logits before
  any logits processor, penalty, temperature, top-k or top-p. With ``temperature`` 1 that is exactly what TRL's loss
  computes for every token, greedy code tokens included. ``processed_logprobs`` (what TRL's own colocate engine
  uses) would report the top-k/top-p-renormalised distribution for prose, and the penalised one for code, neither of
  which the loss computes (``tests/train/vllm/test_vllm_rollout.py`` measures both against the trainer's forward).

Vision tokens are kept out of sampling with a logit bias of -100 (vLLM's bound): the raw log-probs are untouched,
and ``allowed_token_ids`` would mean a vocabulary-sized list in every request.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

from thyme.backends.base import FINISH_EOS, FINISH_LENGTH, FINISH_STOP, SamplingParams
from thyme.errors import BackendError
from thyme.train.policy import PolicyBackend

logger = logging.getLogger(__name__)

# vLLM clamps logit biases to [-100, 100].
_SUPPRESS_BIAS = -100.0


def vllm_processor_kwargs(min_pixels: int, max_pixels: int) -> dict[str, int]:
    """``mm_processor_kwargs`` that make vLLM's image processor resize within the trainer's bounds."""
    return {"min_pixels": int(min_pixels), "max_pixels": int(max_pixels)}


def collapse_image_runs(ids: Sequence[int], image_pad_id: int) -> list[int]:
    """``ids`` with every run of image-pad tokens cut to one pad: the form vLLM expands with its own processor."""
    out: list[int] = []
    for token in ids:
        if token == image_pad_id and out and out[-1] == image_pad_id:
            continue
        out.append(token)
    return out


def vllm_sampling_params(
    sampling: SamplingParams, stop: Sequence[str], max_tokens: int, suppress_ids: Sequence[int]
) -> Any:
    """The ``vllm.SamplingParams`` of one generation call: every knob explicit, so no checkpoint default applies.

    Greedy calls (ATS code spans) get temperature 0; their log-probs are still the raw temperature-1 ones. The stop
    string stays in the text (the loop expects it there); the token that completed it stays in the ids, as in the
    transformers path.
    """
    from vllm import SamplingParams as VLLMSamplingParams

    greedy = sampling.greedy
    return VLLMSamplingParams(
        n=1,
        temperature=0.0 if greedy else sampling.temperature,
        top_p=1.0 if greedy else sampling.top_p,
        top_k=0 if greedy else sampling.top_k,
        min_p=0.0,
        repetition_penalty=sampling.repetition_penalty,
        max_tokens=max_tokens,
        stop=list(stop) or None,
        include_stop_str_in_output=True,
        logprobs=0,
        logit_bias={int(token): _SUPPRESS_BIAS for token in suppress_ids},
        seed=sampling.seed,
        skip_special_tokens=True,
    )


def finish_reason(completion: Any) -> str:
    """Thyme's finish reason of a vLLM completion: a stop string, the end of the turn, or the token cap."""
    if completion.finish_reason == "length":
        return FINISH_LENGTH
    if isinstance(completion.stop_reason, str):
        return FINISH_STOP
    return FINISH_EOS


class VLLMEngineDriver:
    """Runs an in-process ``vllm.LLM`` from one thread; any thread may submit a request and wait for it.

    vLLM's ``LLM.generate`` takes a whole batch and returns when all of it is done; a rollout's next call is only
    known after its sandbox ran, so requests must join the running batch one by one. ``LLMEngine.add_request`` /
    ``step`` do that, but they are not thread-safe: this driver is the only thread that calls them.

    Args:
        llm: a started ``vllm.LLM`` (in-process engine: ``distributed_executor_backend="external_launcher"``).
    """

    def __init__(self, llm: Any) -> None:
        self.llm = llm
        self._engine = llm.llm_engine
        self._cond = threading.Condition()
        self._pending: list[tuple[str, dict, Any, Future]] = []
        self._running: dict[str, Future] = {}
        self._closed = False
        # Held while the engine works; weight sync takes it so it never overlaps a step.
        self.engine_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="thyme-vllm-driver", daemon=True)
        self._thread.start()

    def generate(self, prompt: dict, params: Any) -> Any:
        """Submits one request (``{"prompt_token_ids", "multi_modal_data"}``) and returns its ``RequestOutput``.

        Raises:
            BackendError: the driver was closed.
            Exception: whatever vLLM raised for this request (a too-long prompt, too many images, ...).
        """
        future: Future = Future()
        with self._cond:
            if self._closed:
                raise BackendError("the vLLM rollout engine was closed")
            self._pending.append((uuid.uuid4().hex, prompt, params, future))
            self._cond.notify()
        return future.result()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._running and not self._closed:
                    self._cond.wait()
                if self._closed:
                    break
                pending, self._pending = self._pending, []
            with self.engine_lock:
                for request_id, prompt, params, future in pending:
                    try:
                        self._engine.add_request(request_id, prompt, params)
                    except Exception as exc:  # noqa: BLE001 (handed to the waiting rollout, which raises it)
                        future.set_exception(exc)
                    else:
                        self._running[request_id] = future
                if not self._running:
                    continue
                try:
                    outputs = self._engine.step()
                except Exception as exc:  # noqa: BLE001 (every waiting rollout gets it; the engine may be broken)
                    logger.exception("vLLM engine step failed")
                    for future in self._running.values():
                        future.set_exception(exc)
                    self._running.clear()
                    continue
            for output in outputs:
                if output.finished:
                    self._running.pop(output.request_id).set_result(output)
        for future in [*self._running.values(), *(p[3] for p in self._pending)]:
            future.set_exception(BackendError("the vLLM rollout engine was closed"))

    def close(self) -> None:
        """Stops the driver thread (the engine itself belongs to whoever started it)."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=60)


class VLLMPolicyBackend(PolicyBackend):
    """:class:`~thyme.train.policy.PolicyBackend` whose sampling step is one request to a shared vLLM engine.

    Args:
        engine: anything with ``generate(prompt, params) -> RequestOutput`` (a :class:`VLLMEngineDriver`).
        processor / lock / max_completion_tokens / sampling_override: as :class:`PolicyBackend` (``model`` is not
            used: the engine holds the weights, synced after every optimizer step).
    """

    def __init__(self, engine: Any, processor: Any, **kwargs: Any) -> None:
        super().__init__(None, processor, **kwargs)
        self._engine = engine
        self._pad_id = self._tokenizer.convert_tokens_to_ids(processor.image_token)

    def _request(self) -> dict:
        tokens = self.tokens
        ids = tokens.prompt_ids + tokens.completion_ids
        prompt: dict[str, Any] = {"prompt_token_ids": collapse_image_runs(ids, self._pad_id)}
        if tokens.images:
            prompt["multi_modal_data"] = {"image": list(tokens.images)}
        return prompt

    def _sample(self, stop, sampling: SamplingParams, budget: int):
        tokens = self.tokens
        expected = tokens.prompt_ids + tokens.completion_ids
        params = vllm_sampling_params(sampling, stop, budget, self._suppress)
        output = self._engine.generate(self._request(), params)
        check_expansion(list(output.prompt_token_ids), expected, self._pad_id)
        completion = output.outputs[0]
        new_ids = list(completion.token_ids)
        if completion.logprobs is None or len(completion.logprobs) != len(new_ids):
            raise BackendError("the vLLM engine returned no log-prob per sampled token: request logprobs=0")
        logprobs = [float(entry[token].logprob) for token, entry in zip(new_ids, completion.logprobs, strict=True)]
        return self._finish_call(new_ids, logprobs, stop, finish_reason(completion))

    def _finish_call(self, new_ids: list[int], logprobs: list[float], stop, engine_finish: str):
        """``_sample``'s result from what the engine returned: the text is decoded and cut at the stop string and the
        last token left open exactly as :class:`PolicyBackend` does (the engine reports no logits, so a replacement
        of that token is scored by :meth:`_score`, a prompt-log-prob request)."""
        text, stopped, last = self._cut_at_stop(new_ids, logprobs, stop)
        return new_ids, logprobs, text, FINISH_STOP if stopped else engine_finish, last

    def _score(self, ids: list[int]) -> list[float]:
        """Scores ids appended to the trajectory on the ENGINE: ``ids`` go in as prompt and vLLM returns their prompt
        log-probs (scripted text, and the tokens that replace an open last token at a stop boundary).

        Prompt log-probs are the log-softmax of the raw logits in every ``logprobs_mode``. So a scripted rollout
        (the README example's code and crop) exercises the whole vLLM path of a trajectory: ids and images in the
        assistant turn, the synced weights and the log-probs TRL's importance ratio compares with the loss.
        """
        from vllm import SamplingParams as VLLMSamplingParams

        tokens = self.tokens
        expected = tokens.prompt_ids + tokens.completion_ids + list(ids)
        tokens.completion_ids.extend(ids)  # the request is built from the trajectory's ids; restored below
        try:
            request = self._request()
        finally:
            del tokens.completion_ids[len(tokens.completion_ids) - len(ids) :]
        params = VLLMSamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        output = self._engine.generate(request, params)
        check_expansion(list(output.prompt_token_ids), expected, self._pad_id)
        scored = output.prompt_logprobs[len(expected) - len(ids) :]
        return [float(entry[token].logprob) for token, entry in zip(ids, scored, strict=True)]


def check_expansion(engine_ids: list[int], expected: list[int], pad_id: int) -> None:
    """Raises when vLLM expanded the images to other token counts than the trainer's processor did.

    Raises:
        BackendError: the engine resized an image to another grid (its pixel limits differ from the trainer's).
    """
    if engine_ids == expected:
        return
    raise BackendError(
        f"vLLM expanded the images to {engine_ids.count(pad_id)} image tokens where the trainer's processor made "
        f"{expected.count(pad_id)} ({len(engine_ids)} vs {len(expected)} prompt tokens): the engine resizes images "
        "differently; start it with the trainer's min_pixels/max_pixels (mm_processor_kwargs)"
    )
