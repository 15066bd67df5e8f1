"""Rewards: the original's strict format check, rule accuracy, the judge over a real OpenAI-compatible endpoint,
and the combined weights acc + 0.5*acc*consistency + 0.5*format."""

from __future__ import annotations

import pytest

from thyme.train.rewards import (
    Judge,
    format_ok,
    format_reward,
    make_thyme_rewards,
    reasoning_tail,
    reference_answer,
    rule_match,
    thyme_reward_weights,
)

MCQ = "Question: plate?\nOptions:\nA. S OT 911\nB. S TQ 119\nC. S QT 911\nPlease select the correct answer."


def _message(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def test_format_ok_accepts_the_readme_trajectory(readme_example):
    text = "".join(readme_example["segments"])
    text = text.replace("</code>", "</code><sandbox_output><image></sandbox_output>", 1)
    assert format_ok(text)


@pytest.mark.parametrize(
    "text",
    [
        "<think>x</think><answer>C</answer>",  # no whitespace
        "<think>x</think>\n\n<answer>C</answer>",  # two whitespace characters
        "<think>x</think>\n<answer>C</answer> trailing",  # answer not at the very end
        "<think>a</think> <think>b</think>\n<answer>C</answer>",  # two think blocks
        "<think>x</think>\n<answer>C</answer><answer>D</answer>",  # two answers
        "<think>x\n<answer>C</answer>",  # no </think>
    ],
)
def test_format_ok_rejects_what_the_original_rejected(text):
    assert not format_ok(text)


def test_format_reward_reads_conversational_and_plain_completions():
    good = "<think>x</think>\n<answer>C</answer>"
    assert format_reward([_message(good), good, _message("C")]) == [1.0, 1.0, 0.0]


@pytest.mark.parametrize(
    ("answer", "reference", "question", "expected"),
    [
        ("**C. S QT 911**", "C", MCQ, True),  # the released model's style
        ("The answer is S QT 911", "C", MCQ, True),  # option text, no letter
        ("B", "C", MCQ, False),
        ("(C)", "C", "", True),  # no options in the question: the letter alone decides
        ("3.50", "3.5", "", True),
        ("1,024", "1024", "", True),
        ("12", "13", "", False),
        ("The Red car.", "red car", "", True),
        ("blue", "red", "", False),
        ("\\frac{1}{2}", "0.5", "", True),  # math-verify
    ],
)
def test_rule_match(answer, reference, question, expected):
    assert rule_match(answer, reference, question) is expected


def test_reference_answer_unwraps_thyme_rl_solutions():
    assert reference_answer("<answer> C </answer>") == "C"
    assert reference_answer(" 42 ") == "42"


def test_accuracy_reward_scores_the_first_answer_and_zero_without_one():
    accuracy, _, _ = make_thyme_rewards()
    completions = [
        _message("<think>..</think>\n<answer>C</answer>"),
        _message("<think>..</think>\n<answer>A</answer>"),
        _message("<think>no answer tag</think>"),
        _message("<answer> </answer>"),
    ]
    assert accuracy(completions, solution=["C"] * 4, question=[MCQ] * 4) == [1.0, 0.0, 0.0, 0.0]


def test_consistency_without_a_judge_is_not_scored():
    accuracy, consistency, _ = make_thyme_rewards()
    completions = [_message("<think>x</think>\n<answer>C</answer>")]
    accuracy(completions, solution=["C"], question=[MCQ])
    assert consistency(completions, solution=["C"], question=[MCQ]) == [None]


def test_reasoning_tail_drops_sandbox_blocks_and_images():
    text = "<think>look <sandbox_output><image>crop</sandbox_output> it reads S QT 911</think>\n<answer>C</answer>"
    assert reasoning_tail(text) == "look  it reads S QT 911"


def test_thyme_reward_weights_are_the_originals():
    assert thyme_reward_weights(1.0, 0.5, 0.5) == [1.0, 0.5, 0.5]


@pytest.fixture
def judge_server():
    """A loopback OpenAI-compatible server; ``answer(prompt)`` decides each reply (questions may arrive at once)."""
    from fastapi import FastAPI

    from tests.fixtures.openai_server import serve

    prompts: list[str] = []
    state = {"answer": lambda prompt: "no json here"}
    app = FastAPI()

    @app.post("/v1/chat/completions")
    def chat(body: dict) -> dict:
        prompt = body["messages"][-1]["content"]
        prompts.append(prompt)
        content = state["answer"](prompt)
        return {
            "id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }  # fmt: skip

    with serve(app) as url:
        yield url + "/v1", state, prompts


def _judge_reply(prompt: str) -> str:
    if "Correctness" in prompt:
        return '{"Correctness": 1}' if "a saloon car" in prompt else 'Sure: {"Correctness": 0}'
    return '{"Consistency": 1}'


def test_judge_decides_what_the_rules_cannot_and_gates_consistency(judge_server):
    url, state, prompts = judge_server
    state["answer"] = _judge_reply
    judge = Judge(url, "judge", max_tries=2)
    accuracy, consistency, fmt = make_thyme_rewards(judge)
    completions = [
        _message("<think>it is a sedan</think>\n<answer>a saloon car</answer>"),  # rules fail, judge says 1
        _message("<think>it is a truck</think>\n<answer>a truck</answer>"),  # rules fail, judge says 0
        _message("<think>it is a sedan</think>\n<answer>Sedan.</answer>"),  # rules match: no judge call
        _message("<think>no answer</think>"),  # no answer: 0, no judge call
    ]
    kwargs = {"solution": ["sedan"] * 4, "question": ["What car is it?"] * 4}
    acc = accuracy(completions, **kwargs)
    cst = consistency(completions, **kwargs)
    assert acc == [1.0, 0.0, 1.0, 0.0]
    assert cst == [1.0, 0.0, 1.0, 0.0]  # asked only for the correct answers
    correctness = [p for p in prompts if "Correctness" in p]
    consistency_asked = [p for p in prompts if "Consistency" in p]
    assert len(correctness) == 2 and all("Reference answer: sedan" in p for p in correctness)
    assert len(consistency_asked) == 2 and all("it is a sedan" in p for p in consistency_asked)
    # What TRL sums with reward_weights: acc + 0.5*acc*consistency + 0.5*format.
    weights = thyme_reward_weights(1.0, 0.5, 0.5)
    parts = zip(acc, cst, fmt(completions), strict=True)
    combined = [weights[0] * a + weights[1] * c + weights[2] * f for a, c, f in parts]
    assert combined == [2.0, 0.5, 2.0, 0.0]


def test_judge_without_parseable_json_counts_as_wrong(judge_server):
    url, state, prompts = judge_server
    replies = iter(["maybe", "{bad json}", '{"Correctness": 7}'])
    state["answer"] = lambda prompt: next(replies)
    judge = Judge(url, "judge", max_tries=3)
    assert judge.flag("q", "Correctness") == 0.0
    assert len(prompts) == 3
