"""``thyme-train sft`` on the tiny Qwen2.5-VL: a few steps on generated two-round data with sandbox images, the
frozen vision tower, checkpoint/resume that reproduces an uninterrupted run, LoRA, and config errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from thyme.train.cli import main

EXAMPLE = Path(__file__).resolve().parents[2] / "train" / "examples" / "sft_tiny.yaml"
# Checkpoints are saved in the original Qwen2.5-VL key layout (transformers converts on load and save).
VISION_PREFIX = "visual."
LANGUAGE_PREFIX = "model.layers."


def _run(tiny_model_dir: Path, data: Path, output: Path, *overrides: str) -> int:
    argv = ["sft", str(EXAMPLE), "--override", f"model_name_or_path={tiny_model_dir}"]
    argv += ["--override", f"train_file={data}", "--override", f"output_dir={output}"]
    for override in overrides:
        argv += ["--override", override]
    return main(argv)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


@pytest.fixture(scope="module")
def first_run(tiny_model_dir: Path, sft_jsonl: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four SFT steps (checkpoints at 2 and 4) from the tiny model; returns the output folder."""
    output = tmp_path_factory.mktemp("sft-run")
    assert _run(tiny_model_dir, sft_jsonl, output) == 0
    return output


def test_sft_steps_train_the_language_model_and_keep_the_vision_tower(tiny_model_dir: Path, first_run: Path) -> None:
    before, after = _weights(tiny_model_dir), _weights(first_run)
    assert before.keys() == after.keys()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    language = {name for name in before if name.startswith(LANGUAGE_PREFIX)}
    vision = {name for name in before if name.startswith(VISION_PREFIX)}
    assert vision and not changed & vision, "the frozen vision tower changed"
    assert language and language <= changed, f"language-model weights unchanged: {sorted(language - changed)[:5]}"
    state = json.loads((first_run / "checkpoint-4" / "trainer_state.json").read_text(encoding="utf-8"))
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert (first_run / "processor_config.json").is_file() and (first_run / "chat_template.jinja").is_file()


def test_sft_resume_from_checkpoint_reproduces_the_uninterrupted_run(
    tiny_model_dir: Path, sft_jsonl: Path, first_run: Path, tmp_path: Path
) -> None:
    resumed = tmp_path / "resumed"
    assert _run(tiny_model_dir, sft_jsonl, resumed, f"resume_from_checkpoint={first_run / 'checkpoint-2'}") == 0
    state = json.loads((resumed / "checkpoint-4" / "trainer_state.json").read_text(encoding="utf-8"))
    assert state["global_step"] == 4
    assert not (resumed / "checkpoint-2").exists()  # steps 1-2 were not re-run
    at_two, uninterrupted, again = _weights(first_run / "checkpoint-2"), _weights(first_run), _weights(resumed)
    assert any(not torch.equal(at_two[name], again[name]) for name in at_two)
    for name, tensor in uninterrupted.items():
        torch.testing.assert_close(again[name], tensor, msg=lambda m, name=name: f"{name}: {m}")


def test_sft_resume_latest_without_checkpoint_is_a_clear_error(
    tiny_model_dir: Path, sft_jsonl: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _run(tiny_model_dir, sft_jsonl, tmp_path / "empty", "resume_from_checkpoint=last") == 1
    assert "resume_from_checkpoint=last: no checkpoint-* folder in" in capsys.readouterr().err


def test_sft_lora_saves_an_adapter_outside_the_vision_tower(
    tiny_model_dir: Path, sft_jsonl: Path, tmp_path: Path
) -> None:
    output = tmp_path / "lora"
    code = _run(
        tiny_model_dir,
        sft_jsonl,
        output,
        "use_peft=true",
        "lora_r=4",
        "lora_alpha=8",
        "lora_target_modules=[q_proj, v_proj, gate_proj]",
        "max_steps=2",
        "save_steps=100",
    )
    assert code == 0
    adapter = load_file(str(output / "adapter_model.safetensors"))
    assert any("language_model" in name and "gate_proj.lora_A" in name for name in adapter)
    assert not any(".visual." in name for name in adapter), "LoRA reached the frozen vision tower"
    assert any(tensor.abs().sum() > 0 for name, tensor in adapter.items() if "lora_B" in name)
    assert not (output / "model.safetensors").exists()


def test_sft_config_errors_name_the_problem(
    tiny_model_dir: Path, sft_jsonl: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _run(tiny_model_dir, sft_jsonl, tmp_path / "a", "warmup_steps_typo=3") == 1
    assert "unknown key(s) ['warmup_steps_typo']" in capsys.readouterr().err
    assert _run(tiny_model_dir, sft_jsonl, tmp_path / "b", "remove_unused_columns=true") == 1
    assert "remove_unused_columns must be false" in capsys.readouterr().err
    broken = tmp_path / "broken.jsonl"
    row = json.loads(sft_jsonl.read_text(encoding="utf-8").splitlines()[0])
    crops = [str(sft_jsonl.parent / name) for name in row["image"][1:]]
    broken.write_text(json.dumps(dict(row, image=["missing.png", *crops])) + "\n", encoding="utf-8")
    assert _run(tiny_model_dir, broken, tmp_path / "c") == 1
    err = capsys.readouterr().err
    assert "1 of 3 dataset images do not exist" in err and str(tmp_path / "missing.png") in err
    assert not (tmp_path / "c").exists()


def test_sft_thyme_example_holds_the_original_gpu_settings() -> None:
    from thyme.train.sft import parse_config

    gpu_example = EXAMPLE.with_name("sft_thyme.yaml")
    # use_cpu only lets TrainingArguments accept bf16 on this GPU-less machine.
    config, model_config = parse_config([str(gpu_example), "--override", "use_cpu=true"])
    global_batch = config.per_device_train_batch_size * config.gradient_accumulation_steps * 8
    assert (config.learning_rate, config.num_train_epochs, config.warmup_ratio, global_batch) == (1e-5, 3, 0.05, 128)
    assert (config.max_length, config.max_pixels, config.freeze_vision_tower) == (10240, 3211264, True)
    assert config.last_round_only and config.mask_sandbox_output and config.use_system_prompt
    assert config.bf16 and model_config.dtype == "bfloat16"
    stage2, _ = parse_config(
        [str(gpu_example), "--override", "use_cpu=true", "--override", "learning_rate=1e-6"]
        + ["--override", "use_system_prompt=false"]
    )
    assert stage2.learning_rate == 1e-6 and not stage2.use_system_prompt


def test_resume_hook_signature_matches_the_override() -> None:
    """ThymeSFTTrainer overrides a private transformers hook; a changed signature must fail here, not mid-run."""
    import inspect

    from transformers import Trainer

    from thyme.train.sft import ThymeSFTTrainer

    expected = list(inspect.signature(Trainer._load_from_checkpoint).parameters)
    assert expected == ["self", "resume_from_checkpoint", "model"]
    assert list(inspect.signature(ThymeSFTTrainer._load_from_checkpoint).parameters) == expected


def test_sft_cli_mask_settings_reach_the_collator(
    tiny_model_dir: Path, sft_jsonl: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The YAML's mask keys change what is trained: the default (last round, sandbox masked) trains fewer labels than
    every round, which trains fewer than the naive SFT that also trains the sandbox output."""
    from thyme.train.masking import IGNORE_INDEX
    from thyme.train.sft_collator import ThymeSFTCollator

    trained: list[int] = []
    collate = ThymeSFTCollator.__call__

    def counting(self, rows):
        batch = collate(self, rows)
        trained.append(int((batch["labels"] != IGNORE_INDEX).sum()))
        return batch

    monkeypatch.setattr(ThymeSFTCollator, "__call__", counting)
    counts = []
    settings = [[], ["last_round_only=false"], ["last_round_only=false", "mask_sandbox_output=false"]]
    for index, overrides in enumerate(settings):
        trained.clear()
        assert _run(tiny_model_dir, sft_jsonl, tmp_path / str(index), "max_steps=1", "save_steps=100", *overrides) == 0
        counts.append(trained[-1])
    assert counts[0] < counts[1] < counts[2], counts
