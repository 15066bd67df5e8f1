"""ThymeGRPOConfig: the original's defaults and the checks that stop a bad run before it starts."""

from __future__ import annotations

import pytest

from thyme.errors import ConfigError
from thyme.train.config import ThymeGRPOConfig


def _config(**overrides) -> ThymeGRPOConfig:
    return ThymeGRPOConfig(output_dir="/tmp/thyme-config-test", use_cpu=True, report_to="none", **overrides)


def test_defaults_are_the_original_rl_settings():
    cfg = _config()
    assert (cfg.num_generations, cfg.learning_rate, cfg.beta, cfg.loss_type) == (4, 5e-7, 0.01, "grpo")
    assert (cfg.temperature, cfg.top_p, cfg.top_k, cfg.repetition_penalty) == (1.0, 0.9, 50, 1.05)
    assert (cfg.max_generation_calls, cfg.max_new_tokens_per_call, cfg.max_pixels) == (5, 3196, 2408448)
    assert (cfg.accuracy_weight, cfg.consistency_weight, cfg.format_weight) == (1.0, 0.5, 0.5)
    assert cfg.ats is True and cfg.judge_base_url is None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"temperature": 0.7}, r"temperature \(0.7\) must be 1.0"),
        ({"max_pixels": 100, "min_pixels": 3136}, r"max_pixels \(100\) < min_pixels \(3136\)"),
        ({"max_generation_calls": 0}, r"max_generation_calls \(0\) must be >= 1"),
        ({"max_sandbox_error_rate": 1.5}, r"max_sandbox_error_rate \(1.5\) must be within \[0, 1\]"),
        ({"format_weight": -1.0}, "reward weights"),
        ({"use_vllm": True, "vllm_mode": "remote"}, "vllm_mode 'remote' is not one of colocate, server"),
        ({"vllm_max_images": 0}, r"vllm_max_images \(0\) must be >= 1"),
        ({"use_vllm": True, "vllm_enable_sleep_mode": True}, "vllm_enable_sleep_mode is not supported"),
    ],
)
def test_invalid_settings_fail_with_the_value_and_the_fix(overrides, message):
    with pytest.raises(ConfigError, match=message):
        _config(**overrides)


def test_public_names_of_thyme_train_resolve():
    import thyme.train

    for name in thyme.train.__all__:
        assert getattr(thyme.train, name) is not None, name
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        thyme.train.nope  # noqa: B018
