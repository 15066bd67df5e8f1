"""AgentConfig validation: each message names the value and the fix."""

from __future__ import annotations

import pytest

from thyme.config import AgentConfig
from thyme.errors import ConfigError


def test_defaults_reproduce_the_original_eval():
    config = AgentConfig()
    assert config.max_generation_calls == 5 and config.max_new_tokens == 2048
    assert config.greedy_sampling().greedy and config.greedy_sampling().repetition_penalty == 1.0
    prose = config.prose_sampling()
    assert (prose.temperature, prose.top_p, prose.top_k, prose.repetition_penalty) == (1.0, 0.9, 50, 1.05)
    assert config.image_options == {"min_pixels": 3136, "max_pixels": 12845056}
    assert set(AgentConfig.field_help()) >= {"max_generation_calls", "show_sandbox_errors"}
    assert all(AgentConfig.field_help().values())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_generation_calls": 0}, r"max_generation_calls \(0\) must be at least 1"),
        ({"sampling": "beam"}, r"sampling \('beam'\) must be one of greedy, ats"),
        ({"sampling": "ats", "max_generation_calls": 1}, "a code round costs two calls"),
        ({"temperature": 0}, "use sampling='greedy'"),
        ({"top_p": 1.5}, r"top_p \(1.5\) must be in \(0, 1\]"),
        ({"min_pixels": 5000, "max_pixels": 4000}, r"max_pixels \(4000\) < min_pixels \(5000\): raise max_pixels"),
        ({"sandbox_timeout_s": 0}, "sandbox_timeout_s"),
    ],
)
def test_invalid_values(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        AgentConfig(**kwargs)
