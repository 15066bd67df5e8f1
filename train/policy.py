"""PolicyBackend: the trainer's own model as a :class:`~thyme.backends.base.Backend` for one RL trajectory.

Why not the inference backend (``thyme.backends.local``): the GRPO loss must score exactly the token ids the policy
sampled, in exactly the context it sampled them in. A message-level backend re-renders and re-tokenises the chat on
every call, so byte-pair merges across a segment boundary (``>`` + ``\\n``) can give the loss a sequence the sampler
never saw, and the importance-sampling ratio of those tokens is then wrong. This backend keeps the ids of its
trajectory: the first call tokenises the prompt, every later call tokenises only what the loop appended since
(``<sandbox_output>``, the sandbox's images or text, ``</sandbox_output>``) and continues from the kept ids. What it
has built at the end IS the training sample: prompt ids, completion ids, per-token log-probs, the tool mask
(0 = appended by the loop, so sandbox output is neither trained on nor counted in the length normalisation) and the
images in the order their tokens appear (design.md section 5, reference 3.3).

Log-probs are those of the raw distribution at temperature 1 for EVERY sampled token, greedy code tokens included,
which is what TRL's loss computes (``logits / temperature`` with ``temperature=1.0``); reporting 0.0 (= greedy
probability 1) for them would make importance-sampling correction discard code-bearing samples.

With ``script`` set, the text of each call comes from another backend (a :class:`~thyme.backends.scripted.
ScriptedBackend` replaying recorded code-writing text) and this one only tokenises and scores it: a random tiny model
never writes code, so tests and dry runs force the text while the real model computes log-probs and the loss.

Images are resized by the processor's own limits (the trainer sets them from ``min_pixels``/``max_pixels``), not by
the ``min_pixels``/``max_pixels`` keys of the image items: TRL's loss forward runs the same image processor on the
same PIL images, so rollout and loss see identical pixels.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from thyme.backends.base import FINISH_EOS, FINISH_LENGTH, FINISH_STOP, Backend, Generation, SamplingParams
from thyme.backends.vision_inputs import open_image
from thyme.errors import BackendError

VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
_IMAGE_SENTINEL = "\x00image:{}\x00"
_IMAGE_SENTINEL_RE = re.compile("\x00image:(.*?)\x00", re.DOTALL)
# Vision tokens the policy must never sample (TRL suppresses only <|image_pad|>; env-findings.md section 3).
_SUPPRESSED_TOKENS = ("<|image_pad|>", "<|video_pad|>", VISION_START, VISION_END)


@dataclass
class TrajectoryTokens:
    """One rollout as the GRPO loss consumes it.

    Args:
        prompt_ids: the rendered system + user turn (generation prompt included).
        completion_ids: everything after it: sampled tokens and the loop's appended sandbox tokens.
        logprobs: per completion token, the temperature-1 log-prob of the sampled token (None where not sampled).
        tool_mask: per completion token, 1 = sampled by the policy (trained), 0 = appended by the loop.
        images: every image in token order: the input image(s), then the sandbox images (PIL, RGB).
    """

    prompt_ids: list[int]
    completion_ids: list[int] = field(default_factory=list)
    logprobs: list[float | None] = field(default_factory=list)
    tool_mask: list[int] = field(default_factory=list)
    images: list = field(default_factory=list)
    image_spans: list[tuple[int, int]] = field(default_factory=list)  # completion-token span of each sandbox image


def _assistant_key(messages: list[dict]) -> str:
    """The assistant message as one string with images as sentinels, to find what the loop appended."""
    if messages[-1]["role"] != "assistant":
        return ""
    parts = []
    for item in messages[-1]["content"]:
        parts.append(_IMAGE_SENTINEL.format(item["image"]) if item["type"] == "image" else item["text"])
    return "".join(parts)


class PolicyBackend:
    """Generates (or scores scripted text) with the trainer's model for ONE trajectory, keeping its token ids.

    Args:
        model: the policy (unwrapped ``PreTrainedModel``; may be a PEFT model).
        processor: the Qwen-VL processor whose image processor and tokenizer the loss forward uses too.
        lock: serialises model calls across the threads that run a batch's rollouts concurrently.
        script: when set, the backend whose text every call replays instead of sampling.
        max_completion_tokens: cap on the trajectory's completion; a call is shortened to fit, then returns "".
        sampling_override: when set, every call samples with it whatever the loop asked: ``ats=False`` samples
            code spans too (the loop's own policy is ATS or all-greedy).
    """

    def __init__(
        self,
        model: Any,
        processor: Any,
        *,
        lock: threading.Lock,
        script: Backend | None = None,
        max_completion_tokens: int | None = None,
        sampling_override: SamplingParams | None = None,
    ) -> None:
        self._model = model
        self._processor = processor
        self._tokenizer = processor.tokenizer
        self._lock = lock
        self._script = script
        self._max_completion = max_completion_tokens
        self._override = sampling_override
        self._eos_id = self._tokenizer.convert_tokens_to_ids(self._tokenizer.eos_token)
        self._suppress = self._tokenizer.convert_tokens_to_ids(list(_SUPPRESSED_TOKENS))
        self.tokens: TrajectoryTokens | None = None
        self._prompt_images = 0
        self._key = ""
        self._pixel_values: list[torch.Tensor] = []
        self._grids: list[torch.Tensor] = []

    # ----- context bookkeeping ------------------------------------------------------------------------------------
    def start(self, messages: list[dict]) -> None:
        """Tokenises the prompt (system + user turn with its images); the first ``generate`` calls it."""
        prompt = [m for m in messages if m["role"] != "assistant"]
        # One (Rust) tokenizer serves every rollout thread, and concurrent use can fail ("Already borrowed").
        with self._lock:
            text = self._processor.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        images = [open_image(item["image"]) for m in prompt if isinstance(m["content"], list)
                  for item in m["content"] if item["type"] == "image"]  # fmt: skip
        with self._lock:
            encoded = self._processor(text=[text], images=images or None, return_tensors="pt")
        self.tokens = TrajectoryTokens(prompt_ids=encoded["input_ids"][0].tolist(), images=images)
        self._prompt_images = len(images)
        self._add_vision(encoded)

    def _add_vision(self, encoded) -> None:
        if "pixel_values" in encoded:
            self._pixel_values.append(encoded["pixel_values"])
            self._grids.append(encoded["image_grid_thw"])

    def _append_loop_text(self, messages: list[dict]) -> None:
        """Tokenises what the loop appended to the assistant message since the last call (tool mask 0)."""
        key = _assistant_key(messages)
        if not key.startswith(self._key):
            raise BackendError(
                "the loop changed assistant text the policy already generated; PolicyBackend can only continue it"
            )
        suffix, self._key = key[len(self._key) :], key
        if not suffix:
            return
        paths = _IMAGE_SENTINEL_RE.findall(suffix)
        text = _IMAGE_SENTINEL_RE.sub(VISION_START + self._processor.image_token + VISION_END, suffix)
        images = [open_image(path) for path in paths]
        with self._lock:
            encoded = self._processor(text=[text], images=images or None, return_tensors="pt")
        ids = encoded["input_ids"][0].tolist()
        tokens = self.tokens
        start = len(tokens.completion_ids)
        pad_id = self._tokenizer.convert_tokens_to_ids(self._processor.image_token)
        tokens.image_spans.extend(_image_spans(ids, pad_id, start, VISION_START, self._tokenizer))
        tokens.completion_ids.extend(ids)
        tokens.logprobs.extend([None] * len(ids))
        tokens.tool_mask.extend([0] * len(ids))
        tokens.images.extend(images)
        self._add_vision(encoded)

    def _model_inputs(self) -> dict[str, torch.Tensor]:
        tokens = self.tokens
        ids = torch.tensor([tokens.prompt_ids + tokens.completion_ids], device=self._model.device)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if self._pixel_values:
            inputs["pixel_values"] = torch.cat(self._pixel_values).to(self._model.device, self._model.dtype)
            inputs["image_grid_thw"] = torch.cat(self._grids).to(self._model.device)
            pad_id = self._tokenizer.convert_tokens_to_ids(self._processor.image_token)
            inputs["mm_token_type_ids"] = (ids == pad_id).long()
        return inputs

    # ----- Backend protocol ---------------------------------------------------------------------------------------
    def generate(self, messages: list[dict], *, stop: Sequence[str], sampling: SamplingParams) -> Generation:
        """Continues the trajectory: samples with ``sampling`` (or replays the script) and records the new ids."""
        if self.tokens is None:
            self.start(messages)
        self._append_loop_text(messages)
        sampling = self._override or sampling
        tokens = self.tokens
        budget = sampling.max_new_tokens
        if self._max_completion is not None:
            budget = min(budget, self._max_completion - len(tokens.completion_ids))
        prompt_tokens = len(tokens.prompt_ids) + len(tokens.completion_ids)
        if budget <= 0:
            return Generation("", FINISH_LENGTH, prompt_tokens, [], [])
        if self._script is not None:
            new_ids, logprobs, text, finish = self._score_script(messages, stop, sampling, budget)
        else:
            new_ids, logprobs, text, finish = self._sample(stop, sampling, budget)
        tokens.completion_ids.extend(new_ids)
        tokens.logprobs.extend(logprobs)
        tokens.tool_mask.extend([1] * len(new_ids))
        self._key += text
        return Generation(text, finish, prompt_tokens, list(new_ids), list(logprobs))

    def _score_script(self, messages, stop, sampling, budget) -> tuple[list[int], list[float], str, str]:
        forced = self._script.generate(messages, stop=stop, sampling=sampling)
        with self._lock:
            ids = self._tokenizer(forced.text, add_special_tokens=False)["input_ids"]
        text, finish = forced.text, forced.finish_reason
        if finish == FINISH_EOS:
            ids = [*ids, self._eos_id]  # a model ends its turn with <|im_end|>; the text never shows it
        if len(ids) > budget:  # the completion cap is in real tokens: cut the script there, as a model would stop
            ids = ids[:budget]
            with self._lock:
                text = self._tokenizer.decode(ids, skip_special_tokens=True)
            finish = FINISH_LENGTH
        if not ids:
            return [], [], text, finish
        return ids, self._score_ids(ids), text, finish

    def _score_ids(self, ids: list[int]) -> list[float]:
        """Temperature-1 log-probs of ``ids`` appended to the trajectory, from one forward pass of the policy."""
        inputs = self._model_inputs()
        full = torch.cat([inputs["input_ids"], torch.tensor([ids], device=self._model.device)], dim=1)
        inputs["input_ids"], inputs["attention_mask"] = full, torch.ones_like(full)
        if "mm_token_type_ids" in inputs:
            pad = inputs["mm_token_type_ids"].new_zeros((1, len(ids)))
            inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], pad], dim=1)
        with self._lock, torch.no_grad():
            logits = self._model(**inputs).logits[0, -len(ids) - 1 : -1].float()
        logprobs = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(ids, device=logits.device)[:, None])
        return logprobs[:, 0].tolist()

    def _sample(self, stop, sampling: SamplingParams, budget: int) -> tuple[list[int], list[float], str, str]:
        inputs = self._model_inputs()
        options = {"do_sample": False}
        if not sampling.greedy:
            # Every knob explicit (top_k 0 = off): a checkpoint's generation_config must not add its own.
            options = {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p,
                       "top_k": sampling.top_k}  # fmt: skip
        with self._lock, torch.no_grad():
            out = self._model.generate(
                **inputs,
                **options,
                max_new_tokens=budget,
                repetition_penalty=sampling.repetition_penalty,
                stop_strings=list(stop) or None,
                tokenizer=self._tokenizer,
                suppress_tokens=self._suppress,
                output_logits=True,
                return_dict_in_generate=True,
                pad_token_id=self._tokenizer.pad_token_id,
            )
        new_ids = out.sequences[0, inputs["input_ids"].shape[1] :].tolist()
        raw = torch.stack(out.logits)[: len(new_ids), 0].float()  # logits BEFORE any sampling processor
        logprobs = torch.log_softmax(raw, dim=-1).gather(1, torch.tensor(new_ids, device=raw.device)[:, None])
        with self._lock:
            text = self._tokenizer.decode(new_ids, skip_special_tokens=True)
        hits = [text.find(s) + len(s) for s in stop if s in text]
        if hits:
            text, finish = text[: min(hits)], FINISH_STOP
        else:
            finish = FINISH_EOS if new_ids and new_ids[-1] == self._eos_id else FINISH_LENGTH
        return new_ids, logprobs[:, 0].tolist(), text, finish

    def finish(self, *, answered: bool) -> TrajectoryTokens:
        """Returns the training sample.

        An answered trajectory ends with ``<|im_end|>`` (the original cut the message after ``</answer>`` and its
        template appended the end of turn, trained). A completion over ``max_completion_tokens`` (sandbox output
        can push it there) is cut, and an image whose tokens the cut splits is dropped with them, so the loss
        forward never sees image tokens without their pixels.

        Raises:
            BackendError: the loop never called the backend.
        """
        if self.tokens is None:
            raise BackendError("the rollout made no generation call, so there is no trajectory to train on")
        tokens = self.tokens
        if answered and tokens.completion_ids and tokens.completion_ids[-1] != self._eos_id:
            tokens.completion_ids.append(self._eos_id)
            tokens.logprobs.append(None)
            tokens.tool_mask.append(1)
        cap = self._max_completion
        if cap is not None and len(tokens.completion_ids) > cap:
            cut = min([cap, *(begin for begin, end in tokens.image_spans if end > cap)])
            kept = sum(1 for _, end in tokens.image_spans if end <= cut)
            dropped = len(tokens.image_spans) - kept
            if dropped:
                tokens.images = tokens.images[: len(tokens.images) - dropped]
                tokens.image_spans = tokens.image_spans[:kept]
            del tokens.completion_ids[cut:], tokens.logprobs[cut:], tokens.tool_mask[cut:]
        return tokens

    def failed_sample(self) -> TrajectoryTokens:
        """The sample of a failed rollout: its prompt and a lone end-of-turn token outside the loss (tool mask 0)."""
        if self.tokens is None:
            raise BackendError("the rollout failed before its prompt was built")
        images = self.tokens.images[: self._prompt_images]
        return TrajectoryTokens(self.tokens.prompt_ids, [self._eos_id], [None], [0], images)

    def close(self) -> None:
        """Nothing to release: the model belongs to the trainer."""


def _image_spans(ids: list[int], pad_id: int, offset: int, start_token: str, tokenizer) -> list[tuple[int, int]]:
    """(start, end) completion positions of each image block (vision_start ... vision_end) in ``ids``."""
    start_id = tokenizer.convert_tokens_to_ids(start_token)
    spans, begin = [], None
    for index, token in enumerate(ids):
        if token == start_id:
            begin = index
        elif token != pad_id and begin is not None:
            spans.append((offset + begin, offset + index + 1))
            begin = None
    return spans
