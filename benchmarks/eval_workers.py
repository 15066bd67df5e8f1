"""What ``thyme eval --workers K`` buys against an OpenAI-compatible server: wall time of K=1 / wall time of K.

A stand-in server on 127.0.0.1 answers every chat request after a fixed latency (a GPU server's time per request,
which it can serve concurrently, as vLLM batches), so the ratio isolates the harness's concurrency from model speed.
The rows are a synthetic ``thyme bench synth`` set answered in ``--mode direct`` (one request per row) or
``--mode thyme`` (requests plus sandbox runs: the stand-in answers with a crop-and-zoom code block first).

    python benchmarks/eval_workers.py                       # 16 rows, 0.2 s latency, workers 1 2 4 8
    python benchmarks/eval_workers.py --mode thyme --rows 8 --latency-s 0.5

Prints one line per worker count: wall seconds and speed-up over one worker (ideal: min(K, rows)).
"""

from __future__ import annotations

import argparse
import socket
import tempfile
import threading
import time
from pathlib import Path

CROP_CODE = (
    "<code>\n```python\nfrom PIL import Image\nimage = Image.open(image_path)\n"
    "crop = image.crop((0, 0, 128, 128))\nprocessed_path = '/mnt/data/temp_processed_images/c.png'\n"
    "crop.save(processed_path)\nprint(processed_path)\n```\n</code>"
)


def _app(latency_s: float):
    from fastapi import FastAPI

    app = FastAPI()

    @app.post("/v1/chat/completions")
    def chat(body: dict) -> dict:
        time.sleep(latency_s)
        continuing = body["messages"][-1]["role"] == "assistant"
        wants_code = "</code>" in (body.get("stop") or []) and not continuing
        content = f"<think>Zoom. {CROP_CODE}" if wants_code else "</think>\n<answer>A</answer>"
        choice = {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
        usage = {"prompt_tokens": 100, "completion_tokens": 10, "total_tokens": 110}
        return {
            "id": "c",
            "object": "chat.completion",
            "created": 0,
            "model": "m",
            "choices": [choice],
            "usage": usage,
        }

    return app


def _serve(app) -> tuple[str, object, threading.Thread]:
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    return f"http://127.0.0.1:{sock.getsockname()[1]}/v1", server, thread


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--latency-s", type=float, default=0.2)
    parser.add_argument("--mode", choices=("direct", "thyme"), default="direct")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8])
    args = parser.parse_args()

    from thyme.backends.openai_compat import OpenAIBackend
    from thyme.evaluation.harness import EvalConfig, run_evaluation
    from thyme.evaluation.synth import generate_synth
    from thyme.sandbox import Sandbox

    url, server, thread = _serve(_app(args.latency_s))
    with tempfile.TemporaryDirectory() as tmp, Sandbox(timeout=20) as sandbox:
        data = generate_synth(Path(tmp) / "set", n=args.rows, size=512)
        backend = OpenAIBackend(url, model="m")
        baseline = None
        for workers in args.workers:
            config = EvalConfig(mode=args.mode, workers=workers, progress=False, report_examples=0)
            started = time.perf_counter()
            run_evaluation(data, Path(tmp) / f"out{workers}", lambda item: backend, config, sandbox=sandbox)
            wall = time.perf_counter() - started
            baseline = baseline or wall
            print(f"mode={args.mode} rows={args.rows} latency={args.latency_s}s workers={workers}: "
                  f"{wall:.2f} s, speed-up x{baseline / wall:.2f}")  # fmt: skip
        backend.close()
    server.should_exit = True
    thread.join(timeout=10)


if __name__ == "__main__":
    main()
