"""Groups whose rollouts all get the same reward: their share is logged every step, and dynamic sampling (DAPO)
replaces them with fresh groups, joining rows of several rollout rounds into one batch the loss can use."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.train.test_trainer import _capture_loss_inputs

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "train" / "examples" / "data"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def uneven_script(tmp_path_factory) -> Path:
    """shapes_red: both rollouts crop and answer right (no reward spread); shapes_green: crop + right, wrong."""
    shipped = json.loads((DATA / "rl_script.json").read_text(encoding="utf-8"))["trajectories"]
    script = {
        "trajectories": {
            "shapes_red": [shipped["shapes_red"][0]],
            "shapes_green": [shipped["shapes_green"][0], shipped["shapes_green"][3]],
        }
    }
    path = tmp_path_factory.mktemp("script") / "uneven.json"
    path.write_text(json.dumps(script), encoding="utf-8")
    return path


def _trainer(tiny_model_dir, tmp_path, sandbox, script, **overrides):
    from thyme.train.config import ThymeGRPOConfig
    from thyme.train.data import load_rl_dataset
    from thyme.train.trainer import ThymeGRPOTrainer

    args = ThymeGRPOConfig(
        output_dir=str(tmp_path), use_cpu=True, bf16=False, activation_checkpointing=False, report_to="none",
        per_device_train_batch_size=4, num_generations=2, max_steps=3, logging_steps=1, save_strategy="no",
        learning_rate=1e-3, beta=0.0, min_pixels=28 * 28, max_pixels=256 * 256, max_new_tokens_per_call=1024,
        max_completion_length=2048, sandbox_workers=2, seed=0, **overrides,
    )  # fmt: skip
    return ThymeGRPOTrainer(str(tiny_model_dir), None, args, load_rl_dataset(DATA / "rl.jsonl"), sandbox=sandbox,
                            rollout_script=script)  # fmt: skip


def test_zero_spread_groups_are_counted_every_step(tiny_model_dir, tmp_path, sandbox, uneven_script):
    trainer = _trainer(tiny_model_dir, tmp_path, sandbox, uneven_script)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    shares = [entry["thyme/zero_std_groups"] for entry in logs]
    assert all(share in (0.0, 0.5, 1.0) for share in shares) and any(share > 0 for share in shares)
    for entry in logs:  # every zero-spread group here is one whose rollouts all got a positive reward
        assert entry["thyme/zero_std_groups_rewarded"] == entry["thyme/zero_std_groups"]
        assert entry["thyme/zero_std_groups_unrewarded"] == 0.0


def test_dynamic_sampling_refills_the_batch_with_groups_that_teach(tiny_model_dir, tmp_path, sandbox, uneven_script):
    trainer = _trainer(tiny_model_dir, tmp_path, sandbox, uneven_script, dynamic_sampling=True,
                       dynamic_sampling_max_refills=6)  # fmt: skip
    seen = _capture_loss_inputs(trainer)
    trainer.train()
    assert seen
    pad_id = trainer.processing_class.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    for inputs in seen:
        advantages = inputs["advantages"].view(-1, 2)
        assert (advantages.abs().sum(dim=1) > 0).all(), "a group without reward spread stayed in the batch"
        # Rows joined from several rounds still line up: images, their pixels and tokens, and the log-probs.
        grids = inputs["image_grid_thw"]
        assert len(inputs["num_images"]) == 4 and sum(inputs["num_images"]) == grids.shape[0]
        assert inputs["pixel_values"].shape[0] == int(grids.prod(dim=-1).sum())
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        assert torch.equal(inputs["mm_token_type_ids"], (ids == pad_id).long())
        reported = inputs["sampling_per_token_logps"]
        trained = (inputs["completion_mask"] * inputs["tool_mask"]).bool() & ~reported.isnan()
        got, want = reported[trained], inputs["loss_logps"][trained]
        assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert sum(entry["thyme/dynamic_sampling_refills"] for entry in logs) > 0
    assert all(entry["thyme/dynamic_sampling_unfilled"] == 0.0 for entry in logs)
