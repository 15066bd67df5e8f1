"""Learning you can see on a CPU: the tiny model's GRPO steps raise the rewarded trajectories and lower the others,
a policy that really samples raises a reward it can reach, and SFT's loss falls on the shipped tiny data.

All runs are seeded; each takes seconds to a minute on one thread.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from thyme.train import cli

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "train" / "examples" / "data"

pytestmark = pytest.mark.slow


def _trainer(tiny_model_dir: Path, output: Path, sandbox, *, script: Path | None, reward_funcs=None, **overrides):
    from thyme.train.config import ThymeGRPOConfig
    from thyme.train.data import load_rl_dataset
    from thyme.train.trainer import ThymeGRPOTrainer

    settings = dict(
        output_dir=str(output),
        use_cpu=True,
        bf16=False,
        activation_checkpointing=False,
        report_to="none",
        per_device_train_batch_size=4,
        num_generations=4,
        logging_steps=1,
        save_strategy="no",
        beta=0.0,
        min_pixels=28 * 28,
        max_pixels=256 * 256,
        max_new_tokens_per_call=1024,
        max_completion_length=2048,
        sandbox_workers=2,
        seed=0,
    )
    settings.update(overrides)
    return ThymeGRPOTrainer(
        str(tiny_model_dir),
        reward_funcs,
        ThymeGRPOConfig(**settings),
        load_rl_dataset(DATA / "rl.jsonl"),
        sandbox=sandbox,
        rollout_script=script,
    )


def _token_logps(trainer, inputs: dict) -> torch.Tensor:
    """Per completion token: its temperature-1 log-prob under the trainer's current model (the loss's forward)."""
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    with torch.no_grad():
        logps, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model,
            ids,
            attention,
            inputs["completion_ids"].size(1),
            pixel_values=inputs["pixel_values"],
            image_grid_thw=inputs["image_grid_thw"],
            num_images=inputs["num_images"],
            mm_token_type_ids=inputs["mm_token_type_ids"],
        )[:2]
    return logps


def _own_tokens(inputs: dict) -> tuple[torch.Tensor, list[int]]:
    """Per completion, its partner (the rollout of opposite advantage it shares the longest prefix with) and its
    trained tokens that the partner never uses (`blue`, `B` against `red`, `A`): the tokens that tell a rewarded
    trajectory from an unrewarded one. Shared tokens get both pushes: raising `The crop shows a red` raises `The
    crop shows a blue` too."""
    ids, advantages = inputs["completion_ids"], inputs["advantages"]
    trained = inputs["completion_mask"] * inputs["tool_mask"]
    own, partners = torch.zeros_like(trained), []
    for row in range(len(ids)):
        opposite = [other for other in range(len(ids)) if advantages[row] * advantages[other] < 0]
        partner = max(opposite, key=lambda other: int((ids[row] == ids[other]).int().cumprod(dim=0).sum()))
        partners.append(partner)
        absent = ~torch.isin(ids[row], ids[partner][trained[partner].bool()])
        own[row] = trained[row] * absent.int()
    return own, partners


def test_grpo_raises_the_rewarded_trajectories_and_lowers_the_others(tiny_model_dir, tmp_path, sandbox):
    """The shipped script gives each prompt's 4 rollouts a crop + right answer, a crop + wrong answer, and a right
    and a wrong answer without code: the default rewards (accuracy + format) differ inside every group."""
    # Plain SGD: Adam turns the tiny gradients left where the shared tokens' terms cancel into full-size steps.
    trainer = _trainer(tiny_model_dir, tmp_path, sandbox, script=DATA / "rl_script.json", max_steps=6, optim="sgd",
                       learning_rate=0.5)  # fmt: skip
    seen: list[dict] = []
    original = trainer._compute_loss

    def spy(model, inputs):
        if not seen:  # the first batch, scored under the starting weights
            seen.append({**inputs, "before": _token_logps(trainer, inputs)})
        return original(model, inputs)

    trainer._compute_loss = spy
    trainer.train()
    first = seen[0]
    assert first["advantages"].gt(0).any() and first["advantages"].lt(0).any()
    assert all(entry["frac_reward_zero_std"] == 0 for entry in trainer.state.log_history if "loss" in entry)
    own, partners = _own_tokens(first)
    before_tokens, after_tokens = first["before"], _token_logps(trainer, first)
    before, after = (before_tokens * own).sum(dim=1), (after_tokens * own).sum(dim=1)
    change = after - before
    rewarded, unrewarded = first["advantages"] > 0, first["advantages"] < 0
    print(f"own-token log-prob before {before.tolist()} after {after.tolist()} adv {first['advantages'].tolist()}")
    assert (change[rewarded] > 0).all(), change
    assert (change[unrewarded] < 0).all(), change
    # And each rewarded trajectory gains on its unrewarded partner over the whole sequence.
    trained = first["completion_mask"] * first["tool_mask"]
    total_before, total_after = (before_tokens * trained).sum(dim=1), (after_tokens * trained).sum(dim=1)
    for row in torch.nonzero(rewarded)[:, 0].tolist():
        partner = partners[row]
        assert total_after[row] - total_after[partner] > total_before[row] - total_before[partner]


def tokens_with_a_space_reward(completion_ids, **kwargs):
    """Share of the completion's tokens that start with a space: the tiny model can learn it by sampling."""
    from thyme.tiny import build_tiny_tokenizer

    tokenizer = _TOKENIZER.setdefault("t", build_tiny_tokenizer())
    return [
        sum(tokenizer.convert_ids_to_tokens(token).startswith("Ġ") for token in ids) / max(1, len(ids))
        for ids in completion_ids
    ]


_TOKENIZER: dict = {}


def test_grpo_with_the_policy_sampling_raises_a_reachable_reward(tiny_model_dir, tmp_path, sandbox):
    # Sampling is not bit-reproducible across runs (the prompt names the sandbox's temp input path, so token counts
    # and the random stream shift), so the test asks for what every run shows: with a constant learning rate (a
    # linear decay to 0 left some runs flat) some later 3-step window beats the first by 0.3. Not the last window:
    # at this learning rate a run can reach ~0.8 and then collapse, the known GRPO instability, not a missing signal.
    # Without learning (lr 0) the windows stay within noise (~0.1) of the first.
    trainer = _trainer(tiny_model_dir, tmp_path, sandbox, script=None, reward_funcs=[tokens_with_a_space_reward],
                       per_device_train_batch_size=8, num_generations=8, max_steps=12, learning_rate=2e-2,
                       lr_scheduler_type="constant", max_generation_calls=2, max_new_tokens_per_call=4,
                       max_completion_length=8, sandbox_workers=1)  # fmt: skip
    trainer.train()
    rewards = [entry["reward"] for entry in trainer.state.log_history if "reward" in entry]
    print(f"reward per step: {[round(r, 3) for r in rewards]}")
    assert len(rewards) == 12
    later = [sum(rewards[start : start + 3]) / 3 for start in range(3, 10)]
    assert max(later) > sum(rewards[:3]) / 3 + 0.3


def test_sft_loss_falls_on_the_shipped_tiny_data_from_the_example(tiny_model_dir, tmp_path, monkeypatch):
    """`thyme-train sft train/examples/sft_tiny.yaml` as a fresh clone runs it: only the model is given."""
    monkeypatch.chdir(ROOT)
    output = tmp_path / "sft"
    argv = ["sft", "train/examples/sft_tiny.yaml", "--override", f"model_name_or_path={tiny_model_dir}"]
    assert cli.main([*argv, "--override", f"output_dir={output}", "--override", "max_steps=8"]) == 0
    state = json.loads((output / "checkpoint-8" / "trainer_state.json").read_text(encoding="utf-8"))
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    print(f"SFT loss per step: {losses}")
    assert len(losses) == 8
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.25
