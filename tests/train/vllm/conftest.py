"""One in-process vLLM engine for the whole session (starting one costs 30-60 s on the CPU machine).

Not collected where vLLM is absent (the default install): these tests run in the vLLM venv (docs/train.md "vLLM
rollouts"). The engine serves the head_dim-64 tiny model (vLLM's CPU attention refuses head_dim 16) with the pixel
limits of the RL test trainers, in float32 like the trainers' policy.
"""

from __future__ import annotations

import importlib.util
import os
import socket
from pathlib import Path

import pytest

if importlib.util.find_spec("vllm") is None:  # the default install: nothing here can run
    collect_ignore_glob = ["test_*.py"]

TEST_MIN_PIXELS = 28 * 28
TEST_MAX_PIXELS = 256 * 256
TEST_MAX_IMAGES = 3  # 1 + max_generation_calls // 2 for the default 5 calls


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def vllm_llm(tiny_vllm_model_dir: Path):
    """The shared engine, started as ColocateVLLM starts it (external_launcher, raw log-probs, image limits)."""
    from thyme.train.vllm_sync import start_colocate_llm

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    llm = start_colocate_llm(
        str(tiny_vllm_model_dir),
        dtype="float32",
        max_images=TEST_MAX_IMAGES,
        min_pixels=TEST_MIN_PIXELS,
        max_pixels=TEST_MAX_PIXELS,
        kv_cache_bytes=1 << 30,
        gpu_memory_utilization=0.1,
        max_model_len=4096,
        max_num_seqs=8,
    )
    yield llm


@pytest.fixture(scope="session")
def vllm_driver(vllm_llm):
    from thyme.train.vllm_rollout import VLLMEngineDriver

    driver = VLLMEngineDriver(vllm_llm)
    yield driver
    driver.close()


@pytest.fixture(scope="session")
def vllm_processor(tiny_vllm_model_dir: Path):
    from thyme.backends.processor import load_processor

    return load_processor(tiny_vllm_model_dir, TEST_MIN_PIXELS, TEST_MAX_PIXELS)


@pytest.fixture(scope="session")
def hf_policy(tiny_vllm_model_dir: Path):
    """The tiny model as the trainer loads it (transformers, float32): the reference forward."""
    import torch
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(tiny_vllm_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def make_vllm_trainer(tiny_vllm_model_dir: Path, tmp_path_factory, sandbox, rl_data_file: Path, vllm_llm):
    """A ThymeGRPOTrainer with ``use_vllm`` (colocate) on the shared engine: CPU, G=2, one prompt per step."""
    from thyme.train.config import ThymeGRPOConfig
    from thyme.train.data import load_rl_dataset
    from thyme.train.trainer import ThymeGRPOTrainer

    built = []

    def build(script: Path | None, reward_funcs=None, data_file: Path | None = None, **overrides):
        settings = dict(
            output_dir=str(tmp_path_factory.mktemp("rl-vllm-out")),
            use_cpu=True,
            bf16=False,
            report_to="none",
            per_device_train_batch_size=2,
            num_generations=2,
            max_steps=2,
            logging_steps=1,
            save_strategy="no",
            learning_rate=1e-2,
            beta=0.0,
            min_pixels=TEST_MIN_PIXELS,
            max_pixels=TEST_MAX_PIXELS,
            max_new_tokens_per_call=48,
            max_completion_length=1024,
            sandbox_workers=2,
            seed=0,
            use_vllm=True,
            vllm_mode="colocate",
        )
        settings.update(overrides)
        trainer = ThymeGRPOTrainer(
            str(tiny_vllm_model_dir),
            reward_funcs,
            ThymeGRPOConfig(**settings),
            load_rl_dataset(data_file or rl_data_file),
            sandbox=sandbox,
            rollout_script=script,
            vllm_llm=vllm_llm,
        )
        built.append(trainer)
        return trainer

    yield build
    for trainer in built:
        trainer.close()
