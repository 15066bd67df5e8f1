"""Overhead of the sandbox on the original README example (thyme-reference.md 2.2), against the same ops raw.

Alternates, per iteration, (a) the model's exact code run through a warm ``Sandbox`` session and (b) the same
OpenCV calls made directly in this process (imread, the clamped crop, 2x cubic zoom, imwrite), and prints the
median time of each and the median of the per-iteration ratios. Target on a warm pool: <= 1.3x.
``--one-shot`` also times ``Sandbox.run`` (a fresh session per call: input copy, worker hand-over, clean-up).

    python benchmarks/sandbox_overhead.py [--iterations 40] [--one-shot] [--start-method exec|zygote]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import cv2

from thyme.sandbox import Sandbox

REPO = Path(__file__).resolve().parents[1]
IMAGE = REPO / "thyme" / "data" / "examples" / "17127.jpg"
CODE = json.loads((REPO / "thyme" / "data" / "examples" / "readme_17127.json").read_text())["code"]


def raw_ops(out_dir: str) -> str:
    """What the README code does once the sandbox has repaired it (crop clamped to 64 px high)."""
    image = cv2.imread(str(IMAGE))
    cropped = image[1030:1094, 1250:1360]
    resized = cv2.resize(cropped, None, fx=2, fy=2, interpolation=cv2.INTER_CUBIC)
    path = f"{out_dir}/17127_{str(uuid.uuid4())[:8]}.jpg"
    cv2.imwrite(path, resized)
    return path


def timed(function, *args) -> float:  # noqa: ANN001 - a tiny local helper
    start = time.perf_counter()
    function(*args)
    return time.perf_counter() - start


def main() -> None:
    if os.environ.get("OMP_NUM_THREADS") != "1":
        # The worker runs OpenCV with OMP_NUM_THREADS=1 (process.CLEAN_ENV). Without it the raw side measures
        # OpenMP threads spinning (imread 2-4x slower on a 2-core machine); OpenMP reads it only at load, so re-exec.
        os.execve(sys.executable, [sys.executable, *sys.argv], dict(os.environ, OMP_NUM_THREADS="1"))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=40)
    parser.add_argument("--one-shot", action="store_true", help="also time Sandbox.run with a fresh session each")
    parser.add_argument("--start-method", default=None, help="exec or zygote (a checkout without it: exec)")
    args = parser.parse_args()
    cv2.setNumThreads(1)
    options = {"start_method": args.start_method} if args.start_method else {}
    with Sandbox(timeout=30, pool_size=1, **options) as sandbox, tempfile.TemporaryDirectory() as out_dir:
        sandbox.wait_ready()
        session = sandbox.session(image=str(IMAGE), item_id="17127")

        def run_in_session() -> None:
            result = session.run(CODE)
            assert result.ok and len(result.images) == 1, result.error

        for _ in range(3):  # warm-up: page cache, allocator, first compile
            run_in_session()
            raw_ops(out_dir)
        sandboxed, raw, ratios = [], [], []
        for index in range(args.iterations):
            if index % 2:  # alternate which side goes first, so neither always runs on caches the other warmed
                s, r = timed(run_in_session), timed(raw_ops, out_dir)
            else:
                r, s = timed(raw_ops, out_dir), timed(run_in_session)
            sandboxed.append(s)
            raw.append(r)
            ratios.append(s / r)
        print(f"README example, {args.iterations} alternating iterations, warm session:")
        print(f"  raw in-process    median {statistics.median(raw) * 1000:7.1f} ms")
        print(f"  sandbox session   median {statistics.median(sandboxed) * 1000:7.1f} ms")
        print(f"  median ratio      {statistics.median(ratios):.2f}x   (target <= 1.3x)")
        if args.one_shot:
            one_shot = []
            for _ in range(min(args.iterations, 15)):
                sandbox.wait_ready()  # a replacement worker is started after each one-shot; time only the call
                one_shot.append(timed(sandbox.run, CODE, str(IMAGE)) / timed(raw_ops, out_dir))
            print(f"  one-shot Sandbox.run (fresh session each) median ratio {statistics.median(one_shot):.2f}x")
        session.close()


if __name__ == "__main__":
    main()
