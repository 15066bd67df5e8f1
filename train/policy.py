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

Stop boundaries. A byte-pair token can run past a stop string (Qwen's ``>\n`` after ``</code>``, or ``><`` spanning
``</code><sandbox_output>``), and the loop cuts the text there. Keeping the sampled token and appending the loop's
text after it would train on ``</code>\n<sandbox_output>`` or ``</code><<sandbox_output>`` while inference and SFT,
which tokenise the whole conversation, see ``</code><sandbox_output>``. So the last token of every call (and of
every appended sandbox block) stays open: when the next text arrives (the loop's sandbox output, the next scripted
call, or before the next sampled call), that token's text as the trajectory has it is tokenised together with the
new text, and the merged tokens replace it. The kept ids then always decode to the trajectory's text and are the
ids a whole-conversation tokenisation gives at every boundary. A replacement token that the policy wrote (``><``
for a sampled ``>\n``) is scored at temperature 1 from the logits of its position, kept from the sampling step, or
by a forward pass when the merge produced several tokens.

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


@dataclass
class _OpenTail:
    """The last kept token, whose text may merge with what comes next (see the module docstring)."""

    token_id: int
    text: str  # the token's text as the trajectory has it (cut at the stop string)
    sampled: bool  # written by the policy (tool mask 1) rather than appended by the loop
    logprob: float | None
    logits: torch.Tensor | None = None  # raw logits of its position: scores a one-token replacement without a forward


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
        self._tail: _OpenTail | None = None

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
        """Tokenises what the loop appended to the assistant message since the last call (tool mask 0), merged with
        the open last token (so ``</code>`` + ``<sandbox_output>`` gives the ``><`` token a whole-text tokenisation
        gives)."""
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
        tail = self._take_tail()
        head = tail.text if tail is not None else ""
        with self._lock:
            encoded = self._processor(text=[head + text], images=images or None, return_tensors="pt")
            n_head = _head_token_count(self._tokenizer, head + text, len(head))
        ids = encoded["input_ids"][0].tolist()
        self._put_head(tail, ids[:n_head], model_text=False)
        ids = ids[n_head:]
        tokens = self.tokens
        start = len(tokens.completion_ids)
        pad_id = self._tokenizer.convert_tokens_to_ids(self._processor.image_token)
        tokens.image_spans.extend(_image_spans(ids, pad_id, start, VISION_START, self._tokenizer))
        tokens.completion_ids.extend(ids)
        tokens.logprobs.extend([None] * len(ids))
        tokens.tool_mask.extend([0] * len(ids))
        tokens.images.extend(images)
        self._add_vision(encoded)
        if ids and ids[-1] != pad_id:
            with self._lock:
                last = self._tokenizer.decode(ids[-1:])
            self._tail = _OpenTail(ids[-1], last, sampled=False, logprob=None)

    def _take_tail(self) -> _OpenTail | None:
        """Removes the open last token from the kept ids and returns it (None when there is none)."""
        tail, self._tail = self._tail, None
        if tail is not None:
            tokens = self.tokens
            del tokens.completion_ids[-1], tokens.logprobs[-1], tokens.tool_mask[-1]
        return tail

    def _put_head(self, tail: _OpenTail | None, head_ids: list[int], *, model_text: bool) -> None:
        """Puts back the tokens that replace the open last token: the same token keeps its sampled log-prob; a new
        one is the policy's when the policy wrote the tail or ``model_text`` follows it, scored at temperature 1."""
        if tail is None:
            return
        tokens = self.tokens
        if head_ids == [tail.token_id]:
            tokens.completion_ids.append(tail.token_id)
            tokens.logprobs.append(tail.logprob)
            tokens.tool_mask.append(1 if tail.sampled else 0)
            return
        policy = tail.sampled or model_text
        logprobs: list[float | None] = [None] * len(head_ids)
        if policy and len(head_ids) == 1 and tail.logits is not None:
            logprobs = torch.log_softmax(tail.logits, dim=-1)[head_ids].tolist()
        elif policy and head_ids:
            logprobs = self._score(head_ids)
        tokens.completion_ids.extend(head_ids)
        tokens.logprobs.extend(logprobs)
        tokens.tool_mask.extend([1 if policy else 0] * len(head_ids))

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
        if self._script is None:  # the policy continues right after the tail's text: close it first
            self._close_tail()
        budget = sampling.max_new_tokens
        if self._max_completion is not None:
            budget = min(budget, self._max_completion - len(tokens.completion_ids))
        prompt_tokens = len(tokens.prompt_ids) + len(tokens.completion_ids)
        if budget <= 0:
            return Generation("", FINISH_LENGTH, prompt_tokens, [], [])
        if self._script is not None:
            new_ids, logprobs, mask, text, finish, last = self._score_script(messages, stop, sampling, budget)
        else:
            new_ids, logprobs, text, finish, last = self._sample(stop, sampling, budget)
            mask = [1] * len(new_ids)
        tokens.completion_ids.extend(new_ids)
        tokens.logprobs.extend(logprobs)
        tokens.tool_mask.extend(mask)
        self._key += text
        if finish == FINISH_STOP and last is not None:
            self._tail = last
        return Generation(text, finish, prompt_tokens, list(new_ids), list(logprobs))

    def _close_tail(self) -> None:
        """Replaces an open last token that ran past its stop string by the tokens of its text as the trajectory has
        it (``>\n`` -> ``>``): the next sampled token then follows exactly the text the loop holds."""
        tail = self._take_tail()
        if tail is None:
            return
        with self._lock:
            ids = self._tokenizer(tail.text, add_special_tokens=False)["input_ids"]
        self._put_head(tail, ids, model_text=False)

    def _score(self, ids: list[int]) -> list[float]:
        """Temperature-1 log-probs of ``ids`` appended to the kept sequence (one forward pass)."""
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

    def _score_script(self, messages, stop, sampling, budget):
        """Tokenises the script's next text (merged with the open last token) and scores it with one forward pass.

        Returns:
            ids, log-probs, tool mask, text, finish reason, and the new open tail (None when there are no ids).
        """
        forced = self._script.generate(messages, stop=stop, sampling=sampling)
        text, finish = forced.text, forced.finish_reason
        tail = self._take_tail()
        head = tail.text if tail is not None else ""
        with self._lock:
            ids = self._tokenizer(head + text, add_special_tokens=False)["input_ids"]
            n_head = _head_token_count(self._tokenizer, head + text, len(head))
        if tail is not None and ids[:n_head] == [tail.token_id]:
            self._put_head(tail, ids[:n_head], model_text=False)
            ids, n_head = ids[n_head:], 0
        # A merged token that still lies wholly in the loop's text stays outside the loss; one that reaches into the
        # script's text is the policy's.
        loop_head = tail is not None and not tail.sampled
        with self._lock:
            offsets = _token_ends(self._tokenizer, head + text)[:n_head] if loop_head else []
        mask = [0 if loop_head and offsets[i] <= len(head) else 1 for i in range(n_head)] + [1] * (len(ids) - n_head)
        if finish == FINISH_EOS:
            ids, mask = [*ids, self._eos_id], [*mask, 1]  # a model ends its turn with <|im_end|>; text never shows it
        if len(ids) > budget:  # the completion cap is in real tokens: cut the script there, as a model would stop
            ids, mask = ids[:budget], mask[:budget]
            with self._lock:
                text = self._tokenizer.decode(ids[n_head:], skip_special_tokens=True) if len(ids) > n_head else ""
            finish = FINISH_LENGTH
        if not ids:
            return [], [], [], text, finish, None
        scored = self._score(ids)
        logprobs = [lp if m else None for lp, m in zip(scored, mask, strict=True)]
        with self._lock:
            last_text = self._tokenizer.decode(ids[-1:])
        last = _OpenTail(ids[-1], last_text, sampled=bool(mask[-1]), logprob=logprobs[-1])
        return ids, logprobs, mask, text, finish, last

    def _sample(self, stop, sampling: SamplingParams, budget: int):
        """Samples one call; returns ids, log-probs, the text cut after the stop string, the finish reason, and
        the open tail: the last token with its text up to the stop string and the raw logits of its position."""
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
        logprobs = logprobs[:, 0].tolist()
        text, stopped, last = self._cut_at_stop(new_ids, logprobs, stop, raw[-1] if new_ids else None)
        if stopped:
            finish = FINISH_STOP
        else:
            finish = FINISH_EOS if new_ids and new_ids[-1] == self._eos_id else FINISH_LENGTH
        return new_ids, logprobs, text, finish, last

    def _cut_at_stop(self, new_ids: list[int], logprobs: list[float], stop, logits: torch.Tensor | None = None):
        """The sampled text cut after the first stop string, and the open tail when it stopped: the last token with
        its text up to the stop string (and the raw logits of its position when the sampler has them). Shared by
        every sampler (transformers, vLLM engine, vLLM server) so they all keep the same token boundary.

        Returns:
            (text, whether a stop string ended it, open tail or None).
        """
        with self._lock:
            text = self._tokenizer.decode(new_ids, skip_special_tokens=True)
        hits = [text.find(s) + len(s) for s in stop if s in text]
        if not hits:
            return text, False, None
        text = text[: min(hits)]
        with self._lock:
            before = self._tokenizer.decode(new_ids[:-1], skip_special_tokens=True)
        if text.startswith(before) and len(text) > len(before):
            tail = _OpenTail(new_ids[-1], text[len(before) :], sampled=True, logprob=logprobs[-1], logits=logits)
            return text, True, tail
        return text, True, None

    def finish(self, *, answered: bool, truncated: bool = False) -> TrajectoryTokens:
        """Returns the training sample.

        An answered trajectory ends with ``<|im_end|>`` (the original cut the message after ``</answer>`` and its
        template appended the end of turn, trained). A trajectory the loop ended without an answer and without
        cutting it short (a malformed code block, an empty call) gets ``<|im_end|>`` outside the loss (tool mask 0):
        TRL's ``mask_truncated_completions`` takes a completion that does not end with it for a truncated one and
        would hide its reward. A completion over ``max_completion_tokens`` (sandbox output
        can push it there) is cut, and an image whose tokens the cut splits is dropped with them, so the loss
        forward never sees image tokens without their pixels.

        Raises:
            BackendError: the loop never called the backend.
        """
        if self.tokens is None:
            raise BackendError("the rollout made no generation call, so there is no trajectory to train on")
        self._close_tail()
        tokens = self.tokens
        if not truncated and tokens.completion_ids and tokens.completion_ids[-1] != self._eos_id:
            tokens.completion_ids.append(self._eos_id)
            tokens.logprobs.append(None)
            tokens.tool_mask.append(1 if answered else 0)
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


def _head_token_count(tokenizer, text: str, head_chars: int) -> int:
    """How many leading tokens of ``text`` start inside its first ``head_chars`` characters (the open tail)."""
    if head_chars == 0:
        return 0
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return sum(1 for start, _ in offsets if start < head_chars)


def _token_ends(tokenizer, text: str) -> list[int]:
    """The end character of each token of ``text``."""
    return [end for _, end in tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]]


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
