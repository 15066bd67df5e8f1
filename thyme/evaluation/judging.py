"""The judge stage of ``thyme eval``: an LLM decides the rows the matching rules cannot, as VLMEvalKit does.

VLMEvalKit reads an answer with rules first and asks a judge model only when they fail: for multiple choice it asks
which option the answer picks (the judge never sees the ground truth, so it extracts rather than grades), for yes/no
whether the answer says yes or no, and for free-form answers whether the answer agrees with the reference. We do
the same, in a pass after the rows are answered:

- multiple choice and yes/no rows whose answer no rule could read (``extracted`` is None);
- short-answer rows the rules scored wrong (rules can confirm a short answer, never refute a paraphrase);
- never rows without an answer or rows that failed.

Verdicts are cached in ``judge_cache.jsonl`` keyed by the judge model and the exact prompt, so a resumed run (or the
k runs of ``--samples`` that produce the same answer text) never asks the same question twice. A question the judge
could not answer (network down, no parseable JSON after its tries) is not cached and leaves the rule score in place;
the next run asks again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from thyme.evaluation.datasets import EvalItem
from thyme.evaluation.predictions import Prediction
from thyme.judge import Judge

logger = logging.getLogger(__name__)

JUDGE_CACHE_FILE = "judge_cache.jsonl"
NO_OPTION = "Z"  # the MCQ judge's "none or several of the options" (VLMEvalKit uses Z too)

MCQ_PROMPT = (
    "You are reading a model's answer to a multiple-choice question and must tell which option it chose.\n"
    "Question: {question}\nOptions:\n{options}\nModel answer: {prediction}\n"
    "Which single option does the model answer choose? If it chooses none of them, or more than one, say "
    f'"{NO_OPTION}". Reply with JSON only: {{{{"choice": "<letter>"}}}}.'
)
YES_NO_PROMPT = (
    "You are reading a model's answer to a yes/no question and must tell what it says.\n"
    "Question: {question}\nModel answer: {prediction}\n"
    'Does the answer say yes or no? If it says neither, or both, say "unknown". '
    'Reply with JSON only: {{"answer": "yes"}}, {{"answer": "no"}} or {{"answer": "unknown"}}.'
)
VQA_PROMPT = (
    "You are grading a model's short answer to a question about an image.\n"
    "Question: {question}\nReference answer(s): {reference}\nModel answer: {prediction}\n"
    "Does the model answer mean the same as a reference answer? Reply with JSON only: "
    '{{"Correctness": 1}} if it does, {{"Correctness": 0}} if it does not.'
)


def needs_judge(prediction: Prediction) -> bool:
    """Whether the rules left ``prediction`` undecided (see the module docstring), and no judge decided it yet."""
    if prediction.judged or prediction.error is not None or prediction.prediction is None:
        return False
    if prediction.question_type in ("mcq", "yes_no"):
        return prediction.extracted is None
    return not prediction.correct


def judge_question(item: EvalItem, prediction: Prediction) -> tuple[str, str, tuple[str, ...]]:
    """The judge prompt for a row, the JSON key of the reply, and the values that key may take."""
    answer = prediction.prediction or ""
    if item.question_type == "mcq":
        options = "\n".join(f"{letter}. {text}" for letter, text in item.options.items())
        prompt = MCQ_PROMPT.format(question=item.question, options=options, prediction=answer)
        return prompt, "choice", (*item.options, NO_OPTION)
    if item.question_type == "yes_no":
        return YES_NO_PROMPT.format(question=item.question, prediction=answer), "answer", ("yes", "no", "unknown")
    reference = " | ".join((item.answer, *item.extra_answers))
    return VQA_PROMPT.format(question=item.question, reference=reference, prediction=answer), "Correctness", ("0", "1")


def apply_verdict(item: EvalItem, prediction: Prediction, verdict: str) -> Prediction:
    """The prediction re-scored with the judge's verdict (``judged=True``; ``extracted`` is what the judge read)."""
    kind = item.question_type
    if kind == "mcq":
        extracted = None if verdict == NO_OPTION else verdict
        correct = extracted == item.answer
    elif kind == "yes_no":
        extracted = None if verdict == "unknown" else verdict
        correct = extracted == item.answer.strip().lower()
    else:
        extracted, correct = prediction.extracted, verdict == "1"
    return dataclasses.replace(prediction, extracted=extracted, correct=correct, judged=True, judge_verdict=verdict)


class JudgeCache:
    """Verdicts on disk, one JSON line each, keyed by the judge model and the prompt; safe across threads."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._verdicts: dict[str, str] = {}
        if path.exists():
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
                try:
                    record = json.loads(line)
                    self._verdicts[record["key"]] = str(record["verdict"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    logger.warning("%s:%d is not a judge verdict; that question will be asked again", path, number)

    @staticmethod
    def key(model: str, prompt: str) -> str:
        return hashlib.sha256(f"{model}\n{prompt}".encode()).hexdigest()

    def get(self, key: str) -> str | None:
        return self._verdicts.get(key)

    def put(self, key: str, verdict: str) -> None:
        with self._lock:
            self._verdicts[key] = verdict
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps({"key": key, "verdict": verdict}) + "\n")


class JudgeStage:
    """Asks ``judge`` about the undecided rows of a run, through a cache file.

    Args:
        judge (`Judge`): the judge model's endpoint.
        cache_path (`Path`): the ``judge_cache.jsonl`` to read and extend (shared by the samples of one run).
    """

    def __init__(self, judge: Judge, cache_path: Path) -> None:
        self.judge = judge
        self.cache = JudgeCache(cache_path)
        self.asked = 0  # questions sent to the judge by this stage (cache hits excluded)

    def decide(self, items: dict[str, EvalItem], predictions: Sequence[Prediction]) -> list[Prediction]:
        """Returns the predictions the judge decided (re-scored), for the rows that need it; others are left out.

        Questions not in the cache are asked concurrently (``judge.max_concurrency``); identical questions once.
        """
        todo = [p for p in predictions if needs_judge(p) and p.index in items]
        questions = {p.index: judge_question(items[p.index], p) for p in todo}
        keys = {index: JudgeCache.key(self.judge.model, prompt) for index, (prompt, _, _) in questions.items()}
        unasked: dict[str, tuple[str, str, tuple[str, ...]]] = {}
        for index, key in keys.items():
            if self.cache.get(key) is None and key not in unasked:
                unasked[key] = questions[index]
        if unasked:
            logger.info("asking the judge %s about %d answer(s)", self.judge.model, len(unasked))
            calls = list(unasked.items())

            def ask(call: tuple[str, tuple[str, str, tuple[str, ...]]]) -> None:
                cache_key, (prompt, key_name, allowed) = call
                verdict = self.judge.ask(prompt, key_name, allowed)
                if verdict is not None:
                    self.cache.put(cache_key, verdict)

            with ThreadPoolExecutor(max_workers=self.judge.max_concurrency, thread_name_prefix="thyme-judge") as pool:
                list(pool.map(ask, calls))
            self.asked += len(calls)
        decided = []
        for prediction in todo:
            verdict = self.cache.get(keys[prediction.index])
            if verdict is None:
                logger.warning("the judge gave no verdict on row %s; its rule score stands", prediction.index)
                continue
            decided.append(apply_verdict(items[prediction.index], prediction, verdict))
        return decided


__all__ = ["JUDGE_CACHE_FILE", "JudgeCache", "JudgeStage", "apply_verdict", "judge_question", "needs_judge"]
