"""``thyme-train`` with ``use_vllm: true`` (colocate) on the tiny model: real loop, sandbox, images in the loss.

Two runs of two optimizer steps each on the shared engine:

- the README example's text replayed (a random model never writes code) and SCORED BY vLLM: the code runs in the
  sandbox, its crop goes into the next request and into the loss forward;
- the policy generating on vLLM (prose sampled, code greedy).

The weight sync is checked with TRL's own quantities: at every step the log-probs vLLM reported
(``sampling_per_token_logps``) must equal the trainer's forward before the update (``old_per_token_logps``). At the
second step that holds only if the first step's update reached the engine (learning rate 1e-2 moves the weights).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

DATA = Path(__file__).resolve().parents[3] / "train" / "examples" / "data"


def alternating_reward(completions, **kwargs):
    """Different rewards inside each group, so the advantages (and the gradient) are not zero."""
    return [float(index % 2) for index in range(len(completions))]


def _capture_loss_inputs(trainer) -> list[dict]:
    seen: list[dict] = []
    original = trainer._compute_loss

    def spy(model, inputs):
        seen.append(dict(inputs))
        return original(model, inputs)

    trainer._compute_loss = spy
    return seen


def _engine_vs_trainer(inputs: dict) -> torch.Tensor:
    """|vLLM's log-prob - the trainer's| over the trained tokens of one batch.

    The one token no engine sampled, the ``<|im_end|>`` closing an answered trajectory, has no log-prob (NaN,
    which TRL leaves out of the importance ratio); every other trained token must have one.
    """
    mask = (inputs["completion_mask"] * inputs["tool_mask"]).bool()
    diff = (inputs["sampling_per_token_logps"] - inputs["old_per_token_logps"]).abs()
    missing = (torch.isnan(diff) & mask).sum(dim=1)
    assert (missing <= 1).all(), missing
    return diff[mask & ~torch.isnan(diff)]


def _in_flight(trainer) -> list[int]:
    """Records how many requests the engine held at each step."""
    driver = trainer._vllm_engine.driver
    seen: list[int] = []
    step = driver._engine.step

    def counting_step():
        seen.append(len(driver._running))
        return step()

    driver._engine.step = counting_step
    trainer._restore_step = lambda: setattr(driver._engine, "step", step)
    return seen


@pytest.fixture(scope="module")
def scripted_run(make_vllm_trainer, readme_script):
    trainer = make_vllm_trainer(readme_script, reward_funcs=[alternating_reward], max_new_tokens_per_call=1024,
                                max_completion_length=2048)  # fmt: skip
    seen = _capture_loss_inputs(trainer)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    return trainer, seen, before


@pytest.fixture(scope="module")
def generated_run(make_vllm_trainer):
    # One sandbox worker: the transformers path would then run one rollout at a time; vLLM runs the whole batch.
    trainer = make_vllm_trainer(None, reward_funcs=[alternating_reward], sandbox_workers=1)
    seen = _capture_loss_inputs(trainer)
    in_flight = _in_flight(trainer)
    try:
        trainer.train()
    finally:
        trainer._restore_step()
    return trainer, seen, in_flight


def test_scripted_rollouts_train_with_the_sandbox_crop_in_the_loss(scripted_run, readme_example):
    trainer, seen, before = scripted_run
    assert len(seen) == 2
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(before[n], p)]
    assert changed
    inputs = seen[0]
    # Two images per sample: the input and the sandbox crop, whose tokens the loss forward must see with pixels.
    assert list(inputs["num_images"]) == [2, 2]
    assert inputs["image_grid_thw"].shape[0] == 4
    assert (inputs["tool_mask"] == 0).any(), "the sandbox output tokens are masked"


def test_engine_logprobs_follow_the_policy_after_each_step(scripted_run):
    _, seen, _ = scripted_run
    for step, inputs in enumerate(seen, start=1):
        diff = _engine_vs_trainer(inputs)
        assert diff.numel() > 0
        assert diff.max() < 1e-3, f"step {step}: vLLM log-probs differ from the trainer's by {diff.max():.4f}"


def test_policy_generated_rollouts_train_on_vllm(generated_run):
    trainer, seen, in_flight = generated_run
    assert len(seen) == 2
    for step, inputs in enumerate(seen, start=1):
        assert inputs["completion_mask"].sum() > 0
        diff = _engine_vs_trainer(inputs)
        assert diff.max() < 1e-3, f"step {step}: vLLM log-probs differ from the trainer's by {diff.max():.4f}"
    assert max(in_flight) == 2, "both rollouts of the batch are in the engine at once"
    logged = [entry for entry in trainer.state.log_history if "sampling/sampling_logp_difference/max" in entry]
    assert len(logged) == 2 and all(entry["sampling/sampling_logp_difference/max"] < 1e-3 for entry in logged)


def test_a_multi_trajectory_script_gives_each_rollout_of_a_group_its_own_trajectory(make_vllm_trainer):
    """The shipped script (right and wrong answers, with and without a crop) on vLLM: the 4 rollouts of a prompt
    replay 4 different trajectories, so the default rewards differ inside the group, and every trained token's
    engine log-prob is the loss forward's (stop boundaries included: `</code><sandbox_output>` merges)."""
    trainer = make_vllm_trainer(DATA / "rl_script.json", data_file=DATA / "rl.jsonl", per_device_train_batch_size=4,
                                num_generations=4, max_steps=1, max_new_tokens_per_call=1024,
                                max_completion_length=2048)  # fmt: skip
    seen = _capture_loss_inputs(trainer)
    trainer.train()
    inputs = seen[0]
    assert len({tuple(row) for row in inputs["completion_ids"].tolist()}) == 4
    assert inputs["advantages"].gt(0).any() and inputs["advantages"].lt(0).any()
    diff = _engine_vs_trainer(inputs)
    assert diff.numel() > 0 and diff.max() < 1e-3, diff.max()
