"""Resume restores the checkpoint's weights (RL and SFT, full model and LoRA), and an interrupted RL run ends where
an uninterrupted one does.

transformers' own loader misses every key of a Qwen-VL checkpoint and silently continues from the base model; the
tests perturb a checkpoint's weights and look for the perturbation in what the resumed run saves.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from thyme.train import cli

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "train" / "examples"
LORA = ["use_peft=true", "lora_r=4", "lora_alpha=8", "lora_target_modules=[q_proj, v_proj]"]

pytestmark = pytest.mark.slow


def _run(kind: str, tiny_model_dir: Path, output: Path, *overrides: str) -> int:
    """Runs the shipped tiny RL or SFT example (its data ships in train/examples/data) with ``overrides``."""
    config = EXAMPLES / ("tiny_cpu.yaml" if kind == "rl" else "sft_tiny.yaml")
    argv = ([] if kind == "rl" else ["sft"]) + [str(config)]
    for override in (f"model_name_or_path={tiny_model_dir}", f"output_dir={output}", *overrides):
        argv += ["--override", override]
    return cli.main(argv)


def _weights_file(folder: Path) -> Path:
    adapter = folder / "adapter_model.safetensors"
    return adapter if adapter.is_file() else folder / "model.safetensors"


def _perturb(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Adds 0.25 to every floating-point weight of the checkpoint (model or adapter); returns the new weights."""
    path = _weights_file(checkpoint)
    weights = load_file(str(path))
    perturbed = {name: (t + 0.25 if t.is_floating_point() else t) for name, t in weights.items()}
    save_file(perturbed, str(path), metadata={"format": "pt"})
    return perturbed


@pytest.mark.parametrize("kind", ["rl", "sft"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_resume_restores_the_checkpoint_weights(kind, lora, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the examples name their data relative to the repository root
    output = tmp_path / "run"
    extra = LORA if lora else []
    assert _run(kind, tiny_model_dir, output, "max_steps=2", "save_steps=2", *extra) == 0
    perturbed = _perturb(output / "checkpoint-2")
    # Resume at the checkpoint's own step: no update runs, so what the run saves is exactly what it loaded.
    assert _run(kind, tiny_model_dir, output, "max_steps=2", "resume_from_checkpoint=true", *extra) == 0
    saved = load_file(str(_weights_file(output)))
    assert saved.keys() == perturbed.keys()
    for name, tensor in perturbed.items():
        torch.testing.assert_close(saved[name], tensor, msg=lambda m, name=name: f"{name} not restored: {m}")


def test_rl_interrupted_run_ends_where_the_uninterrupted_one_does(tiny_model_dir, tmp_path, monkeypatch):
    """Two runs are not bit-identical (each prompt names the sandbox session's random input path, so token counts
    differ by a few), which Adam's first steps (about +-lr per weight whatever the gradient's size) magnify; with
    SGD the interrupted run must end far closer to the uninterrupted one than either is to the start."""
    monkeypatch.chdir(ROOT)
    whole, split = tmp_path / "whole", tmp_path / "split"
    sgd = ("max_steps=4", "optim=sgd", "learning_rate=0.1")
    assert _run("rl", tiny_model_dir, whole, *sgd, "save_steps=100") == 0
    assert _run("rl", tiny_model_dir, split, *sgd, "save_steps=2") == 0
    # Interrupted after step 2 (the schedule still spans 4 steps): drop what came later, resume from checkpoint-2.
    checkpoint = split / "checkpoint-2"
    shutil.rmtree(split / "checkpoint-4")
    (split / "model.safetensors").unlink()
    assert _run("rl", tiny_model_dir, split, *sgd, "save_steps=100", f"resume_from_checkpoint={checkpoint}") == 0
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    final_whole, final_split = load_file(str(whole / "model.safetensors")), load_file(str(split / "model.safetensors"))
    moved = max((final_whole[name] - base[name]).abs().max().item() for name in base)
    apart = max((final_whole[name] - final_split[name]).abs().max().item() for name in base)
    assert moved > 1e-3, "the run did not train"
    assert apart < 0.1 * moved, f"resumed run ended {apart:.2e} from the uninterrupted one (moved {moved:.2e})"
    history = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))["log_history"]
    assert all(entry["frac_reward_zero_std"] < 1 and entry["grad_norm"] > 0 for entry in history)
