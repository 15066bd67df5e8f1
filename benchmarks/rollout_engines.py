"""RL rollouts on the transformers path vs the vLLM path: trajectories/s on the same batch, the policy generating.

Both paths run THE loop (ATS: prose sampled T 1.0 / top-p 0.9 / top-k 50 / repetition penalty 1.05 until
``<code>``/``</answer>``, code greedy until ``</code>``, up to 5 generation calls, the real sandbox) with the tiny
head_dim-64 Qwen2.5-VL (vLLM's CPU attention needs head_dim 64) on the README question and image, G rollouts:

- transformers: :class:`~thyme.train.policy.PolicyBackend`, ``--workers`` rollouts at once, every ``generate``
  behind the trainer's model lock (what ``thyme-train`` does without ``use_vllm``);
- vLLM: :class:`~thyme.train.vllm_rollout.VLLMPolicyBackend` on an in-process engine started as the colocated
  trainer starts it, every rollout of the batch in flight at once (``use_vllm: true``).

    python benchmarks/rollout_engines.py                     # batch 16, 128 new tokens per call, 2 threads
    python benchmarks/rollout_engines.py --batch 32 --max-new-tokens 256 --model-dir /tmp/tiny64

Prints, per path, wall seconds, trajectories/s and sampled tokens/s (a random model's trajectories differ in length
between the two paths, so tokens/s is printed beside trajectories/s), then ``ratio=R`` = vLLM trajectories/s over
transformers trajectories/s. Needs the vLLM install (docs/train.md, "vLLM rollouts"); no GPU, no network.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
import threading
import time
from importlib import resources
from pathlib import Path


def _tiny_model(model_dir: str | None) -> Path:
    from thyme.tiny import build_tiny_model

    if model_dir and (Path(model_dir) / "config.json").is_file():
        return Path(model_dir)
    return build_tiny_model(model_dir or tempfile.mkdtemp(prefix="thyme-tiny64-"), overwrite=True, head_dim=64)


def _run(batch: int, workers: int, make_backend, sandbox, config, image: str, question: str) -> tuple[float, int]:
    from thyme.loop import RolloutRequest
    from thyme.train.rollout import RolloutImagesDir, run_batch

    with RolloutImagesDir() as images_dir:
        requests = [
            RolloutRequest(question, image, 2496, 1392, images_dir.for_sample(i), "17127") for i in range(batch)
        ]
        start = time.perf_counter()
        samples = run_batch(requests, lambda _: make_backend(), sandbox, config, workers=workers)
        wall = time.perf_counter() - start
    failed = [s.error for s in samples if s.error]
    if failed:
        raise SystemExit(f"{len(failed)} rollouts failed: {failed[0]}")
    return wall, sum(sum(s.tokens.tool_mask) for s in samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16, help="rollouts per batch (G x prompts)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="cap per generation call")
    parser.add_argument("--workers", type=int, default=4, help="concurrent rollouts of the transformers path")
    parser.add_argument("--model-dir", default=None, help="head_dim-64 tiny model folder (built there if missing)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (both paths)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per path; the fastest is reported")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForImageTextToText

    from thyme.backends.processor import load_processor
    from thyme.config import AgentConfig
    from thyme.sandbox import Sandbox
    from thyme.train.policy import PolicyBackend
    from thyme.train.vllm_rollout import VLLMEngineDriver, VLLMPolicyBackend
    from thyme.train.vllm_sync import start_colocate_llm

    torch.set_num_threads(args.threads)
    min_pixels, max_pixels = 28 * 28, 256 * 256
    model_dir = _tiny_model(args.model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    processor = load_processor(model_dir, min_pixels, max_pixels)
    examples = resources.files("thyme").joinpath("data", "examples")
    image = str(examples.joinpath("17127.jpg"))
    question = json.loads(examples.joinpath("readme_17127.json").read_text(encoding="utf-8"))["question"]
    config = AgentConfig(sampling="ats", max_attempts=1, use_fallback=False, max_new_tokens=args.max_new_tokens,
                         temperature=1.0, top_p=0.9, top_k=50, repetition_penalty=1.05)  # fmt: skip

    with socket.socket() as sock:  # the in-process engine's (single-rank) process group
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    llm = start_colocate_llm(str(model_dir), dtype="float32", max_images=3, min_pixels=min_pixels,
                             max_pixels=max_pixels, kv_cache_bytes=1 << 30, gpu_memory_utilization=0.1,
                             max_model_len=4096, max_num_seqs=max(args.batch, 1))  # fmt: skip
    torch.set_num_threads(args.threads)  # the engine start may have changed it
    driver = VLLMEngineDriver(llm)
    lock = threading.Lock()
    paths = {
        "transformers": (lambda: PolicyBackend(model, processor, lock=lock), args.workers),
        "vllm": (lambda: VLLMPolicyBackend(driver, processor, lock=lock), args.batch),
    }
    results = {}
    try:
        with Sandbox(timeout=30, pool_size=args.workers) as sandbox:
            print(f"batch {args.batch} policy-generated rollouts, tiny head_dim-64 Qwen2.5-VL, "
                  f"{args.max_new_tokens} new tokens per call, torch threads {args.threads}")  # fmt: skip
            for name, (make_backend, workers) in paths.items():
                _run(2, 2, make_backend, sandbox, config, image, question)  # warm-up
                runs = [_run(args.batch, workers, make_backend, sandbox, config, image, question)
                        for _ in range(args.repeats)]  # fmt: skip
                wall, tokens = min(runs)
                results[name] = args.batch / wall
                print(f"{name:12s} workers {workers:2d}: {wall:7.2f} s  {args.batch / wall:6.2f} trajectories/s  "
                      f"{tokens / wall:8.1f} sampled tokens/s  ({tokens} tokens)")  # fmt: skip
    finally:
        driver.close()
    print(f"ratio={results['vllm'] / results['transformers']:.2f}")


if __name__ == "__main__":
    main()
