"""Load test of ``thyme sandbox serve`` on loopback: concurrent clients running crop-and-zoom programs.

Starts the server as a subprocess on 127.0.0.1 (a free port, a random token), warms it up, then runs CLIENTS
threads x RUNS runs through ``RemoteSandbox`` (a new session every RUNS_PER_SESSION runs, as rollouts do) and
prints throughput, client-side latency p50/p99, the error count (must be 0) and the server's resident memory
before and after (must stay flat). Bounded: every client stops at a deadline and the server is stopped at the end.

    python benchmarks/server_load.py [--clients 8] [--runs 50] [--workers 4]

Exit status 1 when any run failed or the deadline passed.
"""

from __future__ import annotations

import argparse
import random
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil

from thyme.sandbox.errors import SandboxError
from thyme.sandbox.remote import RemoteSandbox

REPO = Path(__file__).resolve().parents[1]
IMAGE = REPO / "thyme" / "data" / "examples" / "17127.jpg"
RUNS_PER_SESSION = 5
WARMUP_RUNS = 5
DEADLINE_S = 480.0
START_TIMEOUT_S = 120.0
ZOOM = 2
PROGRAM = """import cv2
image = cv2.imread({path!r})
x1, y1, x2, y2 = {box}
crop = image[y1:y2, x1:x2]
zoomed = cv2.resize(crop, None, fx={zoom}, fy={zoom}, interpolation=cv2.INTER_CUBIC)
out = "/mnt/data/temp_processed_images/crop_{index}.png"
cv2.imwrite(out, zoomed)
print(out)
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_server(port: int, token_file: Path, workers: int, clients: int) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "thyme.cli", "sandbox", "serve", "--host", "127.0.0.1", "--port", str(port),
               "--token-file", str(token_file), "--workers", str(workers), "--max-sessions", str(2 * clients)]
    server = subprocess.Popen(command, cwd=REPO, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
            return server
        except httpx.TransportError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                raise SystemExit("the sandbox server did not start") from None
            time.sleep(0.2)


def client(sandbox: RemoteSandbox, runs: int, seed: int, deadline: float, latencies: list[float],
           errors: list[str]) -> None:  # fmt: skip
    """Runs ``runs`` crop-and-zoom programs, a new session every RUNS_PER_SESSION runs; records latency/errors."""
    rng = random.Random(seed)
    done = 0
    while done < runs and time.monotonic() < deadline:
        batch = min(RUNS_PER_SESSION, runs - done)
        try:
            with sandbox.session(image=str(IMAGE), item_id=f"client{seed}") as session:
                for _ in range(batch):
                    x1, y1 = rng.randrange(0, 2300), rng.randrange(0, 1200)
                    box = (x1, y1, x1 + rng.randrange(64, 196), y1 + rng.randrange(64, 192))
                    code = PROGRAM.format(path=session.input_paths[0], box=box, zoom=ZOOM, index=done)
                    started = time.perf_counter()
                    result = session.run(code)
                    latencies.append(time.perf_counter() - started)
                    expected = (ZOOM * (box[3] - box[1]), ZOOM * (box[2] - box[0]))
                    if not result.ok or len(result.images) != 1:
                        errors.append(result.error or f"{len(result.images)} images")
                    elif _image_shape(result.images[0]) != expected:
                        errors.append(f"crop {box} came back as {_image_shape(result.images[0])}, not {expected}")
                    done += 1
        except SandboxError as exc:  # an infrastructure failure: counted, and the client goes on
            errors.append(f"{type(exc).__name__}: {exc}")
            done += batch
    if done < runs:
        errors.append(f"client {seed} stopped at the deadline after {done} runs")


def _image_shape(path: str) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as image:
        return image.height, image.width


def run_clients(sandbox: RemoteSandbox, clients: int, runs: int) -> tuple[list[float], list[str], float]:
    latencies: list[float] = []
    errors: list[str] = []
    deadline = time.monotonic() + DEADLINE_S
    threads = [threading.Thread(target=client, args=(sandbox, runs, seed, deadline, latencies, errors))
               for seed in range(clients)]  # fmt: skip
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies, errors, time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--runs", type=int, default=50, help="runs per client")
    parser.add_argument("--workers", type=int, default=4, help="warm workers of the server")
    args = parser.parse_args()
    port, token = free_port(), secrets.token_urlsafe(16)
    with tempfile.TemporaryDirectory() as scratch:
        token_file = Path(scratch) / "token"
        token_file.write_text(token)
        server = start_server(port, token_file, args.workers, args.clients)
    process = psutil.Process(server.pid)
    try:
        with RemoteSandbox(f"http://127.0.0.1:{port}", token=token) as sandbox:
            _, warmup_errors, _ = run_clients(sandbox, args.clients, WARMUP_RUNS)  # imports, first allocations
            rss_before = process.memory_info().rss
            latencies, errors, elapsed = run_clients(sandbox, args.clients, args.runs)
            time.sleep(1.0)  # let closed sessions be torn down
            rss_after = process.memory_info().rss
            metrics = sandbox.metrics()
    finally:
        server.terminate()
        server.wait(timeout=60)
    ms = sorted(1000 * s for s in latencies)
    p99 = ms[max(0, -(-99 * len(ms) // 100) - 1)] if ms else float("nan")
    print(f"clients={args.clients} runs/client={args.runs} server workers={args.workers} "
          f"cpus={psutil.cpu_count()} sessions of {RUNS_PER_SESSION} runs")
    print(f"runs: {len(latencies)} in {elapsed:.1f} s -> throughput {len(latencies) / elapsed:.1f} runs/s")
    print(f"latency per run (client side, incl. image download): p50 {statistics.median(ms):.1f} ms, "
          f"p99 {p99:.1f} ms")
    print(f"server-side latency (last {metrics['latency_window']} runs): {metrics['latency_ms']}")
    print(f"errors: {len(errors)}" + (f" (first: {errors[0]})" if errors else "")
          + f"; in the warm-up: {len(warmup_errors)}")
    print(f"server RSS: before {rss_before / 2**20:.1f} MiB, after {rss_after / 2**20:.1f} MiB "
          f"(delta {(rss_after - rss_before) / 2**20:+.1f} MiB)")
    print(f"server errors by kind: {metrics['errors']}; sessions still open: {metrics['sessions_open']}")
    return 1 if errors or warmup_errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
