"""Fails loudly when TRL changes the private hooks ThymeGRPOTrainer overrides (trl is pinned to 1.16.0).

If one of these fails after a TRL upgrade, re-read trl/trainer/grpo_trainer.py around the named hook and adapt
thyme/train/trainer.py before touching the expectations here.
"""

from __future__ import annotations

import inspect

import trl
from trl import GRPOTrainer

PINNED_TRL = "1.16.0"


def test_trl_version_is_the_pinned_one():
    assert trl.__version__ == PINNED_TRL


def test_generate_hook_signature_and_return_shape():
    assert list(inspect.signature(GRPOTrainer._generate).parameters) == ["self", "prompts"]
    source = inspect.getsource(GRPOTrainer._generate)
    # ThymeGRPOTrainer._generate unpacks exactly this 8-tuple.
    returned = "return prompt_ids, completion_ids, tool_mask, completions, logprobs, extra_fields, images, tool_images"
    assert returned in source
    # The rollout_func contract the trainer's rollout relies on.
    assert "output = self.rollout_func(prompts, self)" in source
    assert 'required_keys = {"prompt_ids", "completion_ids", "logprobs"}' in source
    assert 'tool_mask = extra_fields.pop("env_mask", None)' in source


def test_generate_and_score_hook_routes_tool_images_to_the_loss_forward():
    assert list(inspect.signature(GRPOTrainer._generate_and_score_completions).parameters) == ["self", "inputs"]
    source = inspect.getsource(GRPOTrainer._generate_and_score_completions)
    # The branch that feeds every returned image to the image processor, keyed on self.tools.
    assert "if self.tools and any(imgs for imgs in tool_images) and self._is_vlm:" in source
    assert "flat_images = [img for img_list in images if img_list for img in img_list]" in source
    assert "loss_mask = completion_mask if tool_mask is None else completion_mask * tool_mask" in source
    assert "= self._generate(prompts)" in source


def test_loss_and_logps_hooks_used_by_the_tests_exist():
    params = inspect.signature(GRPOTrainer._get_per_token_logps_and_entropies).parameters
    for name in ("model", "input_ids", "attention_mask", "logits_to_keep", "pixel_values", "image_grid_thw",
                 "num_images", "mm_token_type_ids"):  # fmt: skip
        assert name in params
    assert list(inspect.signature(GRPOTrainer._compute_loss).parameters) == ["self", "model", "inputs"]
    assert "_log_metric" in dir(GRPOTrainer)


def test_reward_sampler_and_batch_hooks_used_by_zero_spread_groups_and_resume():
    """_calculate_rewards returns every process's rewards (the zero-spread metrics and dynamic sampling read them);
    the sampler has no set_epoch of its own; the score step's output keys are those dynamic sampling joins."""
    from trl.trainer.utils import RepeatSampler

    params = list(inspect.signature(GRPOTrainer._calculate_rewards).parameters)
    assert params == ["self", "inputs", "prompts", "completions", "completion_ids_list"]
    assert list(inspect.signature(GRPOTrainer._get_train_sampler).parameters) == ["self", "dataset"]
    assert not hasattr(RepeatSampler, "set_epoch")
    source = inspect.getsource(GRPOTrainer._generate_and_score_completions)
    assert "rewards_per_func = self._calculate_rewards(inputs, prompts, completions, completion_ids_list)" in source
    assert "num_items_in_batch = self.accelerator.gather(loss_mask.sum()).sum()" in source
