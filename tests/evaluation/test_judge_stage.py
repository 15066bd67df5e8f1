"""The judge stage of `thyme eval` and `--samples`: a stand-in judge server counts every question it is asked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from thyme.backends.scripted import ScriptedBackend
from thyme.cli import main
from thyme.config import AgentConfig
from thyme.errors import ConfigError
from thyme.evaluation.harness import EvalConfig, run_evaluation
from thyme.evaluation.report import compare_runs
from thyme.evaluation.sampling import run_samples
from thyme.judge import Judge

# index -> (row, the model's reply). Rows 0, 2, 4 are what no rule can read; 1 and 3 the rules settle.
ROWS = {
    "0": ({"question": "Which car?", "options": ["red", "blue"], "answer": "B"}, "<answer>the second one</answer>"),
    "1": ({"question": "Which car?", "options": ["red", "blue"], "answer": "A"}, "<answer>A</answer>"),
    "2": ({"question": "Is it wet?", "answer": "yes"}, "<answer>It certainly appears so.</answer>"),
    "3": ({"question": "What vehicle?", "answer": "sedan"}, "<answer>Sedan.</answer>"),
    "4": ({"question": "What vehicle?", "answer": "sedan"}, "<answer>a saloon car</answer>"),
}


def _judge_reply(prompt: str) -> str:
    if '"choice"' in prompt:
        return 'The answer picks blue: {"choice": "B"}'
    if '"answer"' in prompt:
        return '{"answer": "yes"}'
    return '{"Correctness": 1}' if "a saloon car" in prompt else '{"Correctness": 0}'


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    Image.new("RGB", (64, 48), "gray").save(tmp_path / "car.png")
    lines = [json.dumps({"index": index, "image": "car.png", **row}) for index, (row, _) in ROWS.items()]
    path = tmp_path / "set.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _scripted(item) -> ScriptedBackend:
    return ScriptedBackend([ROWS[item.index][1]])


def _run(dataset: Path, out: Path, judge: Judge | None):
    config = EvalConfig(mode="direct", progress=False)
    return run_evaluation(dataset, out, _scripted, config, AgentConfig(max_attempts=1), judge=judge)


def test_judge_decides_only_what_the_rules_cannot_and_is_asked_once(stand_in_judge, dataset: Path, tmp_path: Path):
    stand_in_judge.reply = _judge_reply
    judge = Judge(stand_in_judge.url, "judge-model", max_tries=1)
    out = tmp_path / "out"
    result = _run(dataset, out, judge)
    assert stand_in_judge.calls == 3  # rows 0, 2 and 4: never the rows the rules settled
    assert all("the second one" in p or "certainly" in p or "saloon" in p for p in stand_in_judge.prompts)
    assert not any("Reference" in p for p in stand_in_judge.prompts if '"choice"' in p)  # MCQ: extraction, no key
    by_index = {p.index: p for p in result.predictions}
    assert [by_index[i].judged for i in "01234"] == [True, False, True, False, True]
    assert by_index["0"].extracted == "B" and by_index["0"].correct
    assert result.metrics.correct == 5 and result.metrics.judged == 3 and result.metrics.unmatched == 0
    results = json.loads((out / "results.json").read_text())
    assert results["metrics"]["judged"] == 3
    assert results["judge"] == {"endpoint": stand_in_judge.url, "model": "judge-model", "questions_asked": 3}

    _run(dataset, out, judge)  # resumed: every row is done and judged
    assert stand_in_judge.calls == 3
    (out / "predictions.jsonl").unlink()  # answered again from scratch: the verdicts come from the cache
    again = _run(dataset, out, judge)
    assert stand_in_judge.calls == 3 and again.metrics.judged == 3 and again.metrics.correct == 5


def test_rows_of_an_unjudged_run_are_judged_on_resume(stand_in_judge, dataset: Path, tmp_path: Path):
    stand_in_judge.reply = _judge_reply
    out = tmp_path / "out"
    first = _run(dataset, out, None)
    assert first.metrics.correct == 2 and first.metrics.judged == 0 and stand_in_judge.calls == 0
    second = _run(dataset, out, Judge(stand_in_judge.url, "judge-model", max_tries=1))
    assert second.skipped == 5 and stand_in_judge.calls == 3 and second.metrics.correct == 5


def test_a_judge_without_a_verdict_leaves_the_rule_score_and_is_asked_again(stand_in_judge, dataset, tmp_path):
    stand_in_judge.reply = lambda prompt: "I cannot decide."
    out = tmp_path / "out"
    result = _run(dataset, out, Judge(stand_in_judge.url, "judge-model", max_tries=2))
    assert stand_in_judge.calls == 6  # three questions, two tries each
    assert result.metrics.judged == 0 and result.metrics.correct == 2 and result.metrics.unmatched == 2
    stand_in_judge.reply = _judge_reply
    assert _run(dataset, out, Judge(stand_in_judge.url, "judge-model", max_tries=2)).metrics.judged == 3
    assert stand_in_judge.calls == 9


def test_samples_report_mean_and_spread_and_share_the_judge_cache(stand_in_judge, dataset: Path, tmp_path: Path):
    stand_in_judge.reply = _judge_reply
    answered: dict[str, int] = {}

    def alternating(item) -> ScriptedBackend:
        # Row 1 is right in odd runs, wrong in even ones; the other rows answer the same every run.
        answered[item.index] = answered.get(item.index, 0) + 1
        if item.index == "1" and answered["1"] % 2 == 0:
            return ScriptedBackend(["<answer>B</answer>"])
        return _scripted(item)

    config = EvalConfig(mode="direct", progress=False)
    agent = AgentConfig(max_attempts=1, sampling="ats", seed=7)
    judge = Judge(stand_in_judge.url, "judge-model", max_tries=1)
    result = run_samples(dataset, tmp_path / "out", alternating, 2, config, agent, judge=judge)
    assert [run.metrics.correct for run in result.runs] == [5, 4]
    assert stand_in_judge.calls == 3  # the second run's identical answers were judged from the shared cache
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["samples"] == 2 and results["judged_rows"] == [3, 3]
    assert results["accuracy"]["per_sample"] == [1.0, 0.8]
    assert results["accuracy"]["mean"] == pytest.approx(0.9)
    assert results["accuracy"]["std"] == pytest.approx(0.1414, abs=1e-3)  # sample standard deviation
    seeds = [json.loads((tmp_path / "out" / f"sample_{i}" / "results.json").read_text())["agent_config"]["seed"]
             for i in (1, 2)]  # fmt: skip
    assert seeds == [7, 8]
    with pytest.raises(ConfigError, match="compare one of its sample_<i> folders"):
        compare_runs(tmp_path / "out", tmp_path / "out" / "sample_1")


def test_eval_cli_judge_and_samples_flags(stand_in_judge, dataset: Path, tmp_path, monkeypatch, capsys):
    stand_in_judge.reply = _judge_reply
    monkeypatch.setenv("THYME_JUDGE_API_KEY", "sk-judge")
    script = tmp_path / "script.json"
    script.write_text(json.dumps({index: [reply] for index, (_, reply) in ROWS.items()}))
    argv = ["eval", "--data", str(dataset), "--scripted", str(script), "--mode", "direct", "--no-progress"]
    judge = ["--judge-endpoint", stand_in_judge.url, "--judge-model", "judge-model"]
    assert main([*argv, "--out", str(tmp_path / "a"), *judge]) == 0
    out = capsys.readouterr().out
    assert "accuracy 100.0 % (5/5)" in out and "the judge decided 3 row(s)" in out
    assert set(stand_in_judge.authorizations) == {"Bearer sk-judge"}  # the key comes from the environment
    assert main([*argv, "--out", str(tmp_path / "b"), "--samples", "2"]) == 1
    assert "--samples needs sampled decoding: add --sampling ats" in capsys.readouterr().err
    assert main([*argv, "--out", str(tmp_path / "b"), "--samples", "2", "--sampling", "ats", *judge]) == 0
    assert "Avg@2 accuracy 100.0 % (std 0.0" in capsys.readouterr().out
    assert main([*argv, "--out", str(tmp_path / "c"), "--judge-model", "x"]) == 1
    assert "--judge-endpoint and --judge-model go together" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="samples"):
        run_samples(dataset, tmp_path / "d", _scripted, 0, agent_config=AgentConfig(sampling="ats"))
