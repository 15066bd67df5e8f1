"""thyme-train: the shipped tiny config trains on the tiny model, writes a checkpoint and resumes from it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from thyme.train import cli

EXAMPLES = Path(cli.__file__).parent / "examples"

pytestmark = pytest.mark.slow


def _run(config: Path, **overrides) -> int:
    argv = [str(config)]
    for key, value in overrides.items():
        argv += ["--override", f"{key}={value}"]
    return cli.main(argv)


def _state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))


def test_thyme_train_tiny_config_trains_checkpoints_and_resumes(tmp_path, tiny_model_dir, rl_data_file, readme_script):
    output = tmp_path / "run"
    common = dict(
        model_name_or_path=tiny_model_dir, train_file=rl_data_file, rollout_script=readme_script, output_dir=output
    )
    assert _run(EXAMPLES / "tiny_cpu.yaml", **common) == 0
    first = _state(output / "checkpoint-2")
    assert first["global_step"] == 2
    logged = first["log_history"][0]
    assert logged["rewards/accuracy_reward/mean"] == 1.0 and logged["rewards/format_reward/mean"] == 1.0
    assert logged["reward"] == 1.5  # acc + 0.5*format; consistency is not scored without a judge
    assert logged["thyme/code_blocks_per_trajectory"] == 1.0 and logged["thyme/images_per_trajectory"] == 1.0
    assert (output / "model.safetensors").is_file() and (output / "processor_config.json").is_file()

    assert _run(EXAMPLES / "tiny_cpu.yaml", **common, max_steps=3, save_steps=1, resume_from_checkpoint="true") == 0
    resumed = _state(output / "checkpoint-3")
    assert resumed["global_step"] == 3
    # The first two steps' logs come from checkpoint-2, not from a fresh run (their timings would differ).
    assert resumed["log_history"][:2] == first["log_history"][:2]


def test_thyme_train_rejects_unknown_keys_with_their_names(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("model_name_or_path: x\ntrain_file: y\nlearning_rat: 1.0\nturns: 3\n", encoding="utf-8")
    assert cli.main([str(config)]) == 1
    assert "unknown key(s) ['learning_rat', 'turns']" in capsys.readouterr().err


def test_thyme_train_bad_override_is_one_line_error(tmp_path, capsys):
    assert cli.main([str(EXAMPLES / "tiny_cpu.yaml"), "--override", "max_steps"]) == 1
    assert "--override 'max_steps': expected KEY=VALUE" in capsys.readouterr().err


def test_thyme_train_resume_without_checkpoint_says_so(tmp_path, tiny_model_dir, rl_data_file, capsys):
    code = _run(
        EXAMPLES / "tiny_cpu.yaml",
        model_name_or_path=tiny_model_dir,
        train_file=rl_data_file,
        output_dir=tmp_path / "empty",
        resume_from_checkpoint="true",
    )
    assert code == 1
    assert f"no checkpoint-* folder in {tmp_path / 'empty'}" in capsys.readouterr().err


def test_thyme_train_sft_is_routed_to_the_sft_entry_point(monkeypatch):
    import thyme.train.sft

    seen = []
    monkeypatch.setattr(thyme.train.sft, "main", lambda argv: seen.append(argv) or 7)
    assert cli.main(["sft", "conf.yaml", "--override", "a=1"]) == 7
    assert seen == [["conf.yaml", "--override", "a=1"]]


@pytest.mark.parametrize("name", ["tiny_cpu.yaml", "thyme_rl_gpu.yaml"])
def test_shipped_configs_use_only_known_keys(name):
    from transformers import HfArgumentParser
    from trl import ModelConfig

    from thyme.train.config import ThymeGRPOConfig

    keys = set(yaml.safe_load((EXAMPLES / name).read_text(encoding="utf-8")))
    parser = HfArgumentParser((cli.RLDataArguments, ThymeGRPOConfig, ModelConfig))
    known = {field for cls in parser.dataclass_types for field in cls.__dataclass_fields__}
    assert keys <= known, keys - known
