"""Fixtures of the RL tests: the README example as RL data and rollout script, a shared sandbox, a trainer factory."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pytest

EXAMPLES = resources.files("thyme").joinpath("data", "examples")


@pytest.fixture(scope="session")
def readme_example() -> dict:
    """The original README example: question, answer letter, the two scripted model segments."""
    return json.loads(EXAMPLES.joinpath("readme_17127.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def readme_script() -> Path:
    """The README example's model text as a rollout script (a code block that crops the plate, then the answer)."""
    return Path(str(EXAMPLES.joinpath("readme_17127.json")))


@pytest.fixture(scope="session")
def readme_image() -> str:
    return str(EXAMPLES.joinpath("17127.jpg"))


@pytest.fixture(scope="module")
def rl_data_file(tmp_path_factory: pytest.TempPathFactory, readme_example: dict, readme_image: str) -> Path:
    """Two plain RL rows on 17127.jpg (MCQ, reference answer "C")."""
    row = {"image": readme_image, "question": readme_example["question"], "answer": readme_example["answer"]}
    path = tmp_path_factory.mktemp("rl-data") / "rl.jsonl"
    path.write_text("\n".join(json.dumps(row) for _ in range(2)) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def sandbox():
    """One sandbox for a test module (starting workers costs about a second)."""
    from thyme.sandbox import Sandbox

    with Sandbox(timeout=30) as sb:
        yield sb


@pytest.fixture(scope="module")
def make_trainer(tiny_model_dir: Path, tmp_path_factory, sandbox, rl_data_file: Path, readme_script: Path):
    """Builds a ThymeGRPOTrainer on the tiny model (CPU, G=2, one prompt per step) replaying ``readme_script``."""
    from thyme.train.config import ThymeGRPOConfig
    from thyme.train.data import load_rl_dataset
    from thyme.train.trainer import ThymeGRPOTrainer

    def build(script: Path | None = readme_script, reward_funcs=None, peft_config=None, **overrides):
        settings = dict(
            output_dir=str(tmp_path_factory.mktemp("rl-out")),
            use_cpu=True,
            bf16=False,
            activation_checkpointing=False,
            report_to="none",
            per_device_train_batch_size=2,
            num_generations=2,
            max_steps=1,
            logging_steps=1,
            save_strategy="no",
            learning_rate=1e-2,
            beta=0.0,
            min_pixels=28 * 28,
            max_pixels=256 * 256,
            max_new_tokens_per_call=1024,
            max_completion_length=2048,
            sandbox_workers=2,
            seed=0,
        )
        settings.update(overrides)
        args = ThymeGRPOConfig(**settings)
        dataset = load_rl_dataset(rl_data_file)
        return ThymeGRPOTrainer(
            str(tiny_model_dir),
            reward_funcs,
            args,
            dataset,
            sandbox=sandbox,
            rollout_script=script,
            peft_config=peft_config,
        )

    return build
