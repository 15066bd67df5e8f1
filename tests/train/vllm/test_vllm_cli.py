"""``thyme-train`` with ``use_vllm: true`` from the shipped YAML: config, engine settings, two steps, the checkpoint.

The engine start is the session's (one start per test session keeps CI within its time): ``start_colocate_llm`` is
intercepted and must be asked for exactly the settings the YAML implies.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from thyme.train import cli

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

EXAMPLES = Path(cli.__file__).parent / "examples"


def test_thyme_train_use_vllm_trains_the_tiny_model(tmp_path, monkeypatch, tiny_vllm_model_dir, vllm_llm,
                                                    rl_data_file, readme_script):  # fmt: skip
    import thyme.train.vllm_sync as vllm_sync

    asked: list[dict] = []

    def shared_engine(model, **settings):
        asked.append({"model": model, **settings})
        return vllm_llm

    monkeypatch.setattr(vllm_sync, "start_colocate_llm", shared_engine)
    output = tmp_path / "run"
    argv = [str(EXAMPLES / "tiny_cpu_vllm.yaml")]
    for key, value in dict(model_name_or_path=tiny_vllm_model_dir, train_file=rl_data_file,
                           rollout_script=readme_script, output_dir=output).items():  # fmt: skip
        argv += ["--override", f"{key}={value}"]
    assert cli.main(argv) == 0
    assert len(asked) == 1
    settings = asked[0]
    assert settings["model"] == str(tiny_vllm_model_dir)
    assert (settings["min_pixels"], settings["max_pixels"], settings["max_images"]) == (784, 65536, 3)
    assert str(settings["dtype"]) == "torch.float32" and settings["kv_cache_bytes"] == 1 << 30
    state = json.loads((output / "checkpoint-2" / "trainer_state.json").read_text(encoding="utf-8"))
    logged = [entry for entry in state["log_history"] if "loss" in entry]
    assert len(logged) == 2
    for entry in logged:
        assert entry["thyme/code_blocks_per_trajectory"] == 1.0 and entry["thyme/images_per_trajectory"] == 1.0
        assert entry["sampling/sampling_logp_difference/max"] < 1e-3  # the engine follows the policy at each step
    assert (output / "model.safetensors").is_file()
