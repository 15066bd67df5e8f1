"""An LLM judge behind any OpenAI-compatible chat endpoint, asked for one JSON field.

Two users: the RL accuracy and consistency rewards (``thyme.train.rewards``) and the judge stage of ``thyme eval``
(``thyme.evaluation.judging``), which asks it only about the rows the matching rules cannot decide, as VLMEvalKit
does. Both want the same thing from a judge model: a short JSON reply whose one field takes one of a few values,
retried when the reply does not parse. It lives in ``thyme`` (not ``thyme.train``) because the core must not import
the trainer.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

logger = logging.getLogger(__name__)

# The environment variable the CLI reads the judge's API key from (a flag would leak it into `ps` and shell history).
JUDGE_API_KEY_ENV = "THYME_JUDGE_API_KEY"
_JSON_OBJECT = re.compile(r"\{.*?\}", re.DOTALL)


@dataclass
class Judge:
    """An LLM judge behind any OpenAI-compatible chat endpoint (vLLM, SGLang, a hosted API), asked for JSON.

    Args:
        base_url: endpoint base URL, e.g. ``http://localhost:8000/v1``.
        model: the served model name.
        api_key: sent as the bearer token (``"EMPTY"`` for an open vLLM server).
        timeout_s: per-request timeout.
        max_tries: tries per question; a question never answered with parseable JSON is undecided.
        max_concurrency: questions of one batch asked at once (a vLLM judge batches them).
    """

    base_url: str
    model: str
    api_key: str = "EMPTY"
    timeout_s: float = 60.0
    max_tries: int = 3
    temperature: float = 0.1
    max_tokens: int = 256
    max_concurrency: int = 16

    def __post_init__(self) -> None:
        from openai import OpenAI

        self._client = OpenAI(base_url=self.base_url, api_key=self.api_key, timeout=self.timeout_s, max_retries=0)

    def ask(self, prompt: str, key: str, allowed: Collection[str]) -> str | None:
        """Asks ``prompt`` and returns the value of ``key`` in the JSON reply, one of ``allowed`` (compared without
        case; the ``allowed`` spelling is returned), or None when no try gave one (network errors included)."""
        from openai import OpenAIError

        for attempt in range(1, self.max_tries + 1):
            try:
                reply = self._client.chat.completions.create(
                    model=self.model,
                    messages=[{"role": "user", "content": prompt}],
                    temperature=self.temperature,
                    max_tokens=self.max_tokens,
                )
            except OpenAIError as exc:
                logger.warning("judge %s try %d/%d failed: %s", self.base_url, attempt, self.max_tries, exc)
                continue
            value = parse_json_field(reply.choices[0].message.content or "", key, allowed)
            if value is not None:
                return value
            logger.warning("judge reply without a parseable %r (try %d/%d)", key, attempt, self.max_tries)
        return None

    def ask_many(self, prompts: Sequence[str], key: str, allowed: Collection[str]) -> list[str | None]:
        """:meth:`ask` for many prompts, ``max_concurrency`` at a time; results in prompt order."""
        if len(prompts) <= 1:
            return [self.ask(prompt, key, allowed) for prompt in prompts]
        with ThreadPoolExecutor(max_workers=self.max_concurrency, thread_name_prefix="thyme-judge") as pool:
            return list(pool.map(lambda prompt: self.ask(prompt, key, allowed), prompts))

    def flag(self, prompt: str, key: str) -> float:
        """Asks for a 0/1 ``key`` and returns it as a float; 0.0 when no try parses, as the original reward did."""
        value = self.ask(prompt, key, ("0", "1"))
        return float(value) if value is not None else 0.0

    def flags(self, prompts: Sequence[str], key: str) -> list[float]:
        """:meth:`flag` for many prompts, ``max_concurrency`` at a time; results in prompt order."""
        return [float(value) if value is not None else 0.0 for value in self.ask_many(prompts, key, ("0", "1"))]


def parse_json_field(reply: str, key: str, allowed: Collection[str]) -> str | None:
    """The value of ``key`` in the first JSON object of ``reply`` whose value is one of ``allowed`` (without case),
    in the ``allowed`` spelling; None when no object has one. Judges wrap JSON in prose and code fences.

    Example:
        >>> parse_json_field('Sure: {"Correctness": 1}', "Correctness", ("0", "1"))
        '1'
    """
    canonical = {str(value).lower(): str(value) for value in allowed}
    for candidate in _JSON_OBJECT.findall(reply):
        try:
            data = json.loads(candidate)
        except json.JSONDecodeError:
            continue
        if isinstance(data, dict) and key in data and not isinstance(data[key], (dict, list)):
            raw = data[key]
            text = str(int(raw)) if isinstance(raw, bool) else str(raw)  # true/false count as 1/0, as 1 == True
            value = canonical.get(text.strip().lower())
            if value is not None:
                return value
    return None


def judge_api_key() -> str:
    """The judge's API key from ``$THYME_JUDGE_API_KEY``, else ``$OPENAI_API_KEY``, else ``"EMPTY"`` (open vLLM)."""
    return os.environ.get(JUDGE_API_KEY_ENV) or os.environ.get("OPENAI_API_KEY") or "EMPTY"


__all__ = ["JUDGE_API_KEY_ENV", "Judge", "judge_api_key", "parse_json_field"]
