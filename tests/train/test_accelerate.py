"""Two CPU processes (gloo) under ``accelerate launch`` train the tiny model through the Thyme rollout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "train" / "examples"

pytestmark = pytest.mark.slow


def test_accelerate_two_cpu_processes_share_a_step(tmp_path, tiny_model_dir, rl_data_file, readme_script):
    output = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(EXAMPLES / "accelerate_multi_cpu.yaml"),
        "-m", "thyme.train.cli", str(EXAMPLES / "tiny_cpu.yaml"),
        "--override", f"model_name_or_path={tiny_model_dir}", "--override", f"train_file={rl_data_file}",
        "--override", f"rollout_script={readme_script}", "--override", f"output_dir={output}",
        "--override", "max_steps=1", "--override", "save_steps=1",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRL_EXPERIMENTAL_SILENCE": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    state = json.loads((output / "checkpoint-1" / "trainer_state.json").read_text(encoding="utf-8"))
    # The data holds 2 prompts and one process takes 1 prompt (G=2 rollouts) per step: epoch 1.0 after one step
    # means both ranks trained on their own prompt.
    assert state["log_history"][0]["epoch"] == 1.0
    assert state["log_history"][0]["thyme/code_blocks_per_trajectory"] == 1.0
