"""Cost of handing out a returned image: the old in-process header read against the hardened path.

Alternates, per iteration, (a) what the parent did before: ``realpath`` + ``isfile`` + ``PIL.Image.open(...).size``
on the file in the scratch dir, in this process, and (b) what it does now: ``collect_images`` (the ``O_NOFOLLOW``
walk, a copy into a results dir, the header read in the warm checker child). Prints the median time of each per
image.

    python benchmarks/returned_images.py [--iterations 200]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import cv2

from thyme.sandbox.returned import collect_images

REPO = Path(__file__).resolve().parents[1]
IMAGE = REPO / "thyme" / "data" / "examples" / "17127.jpg"


def old_check(path: str, scratch: str, max_pixels: int) -> None:
    """The check before hardening (sandbox/result.py at a0c33f8): follows links, parses in this process."""
    from PIL import Image

    real = os.path.realpath(path)
    assert real.startswith(scratch + os.sep) and os.path.isfile(real)
    with Image.open(real) as image:
        width, height = image.size
    assert width * height <= max_pixels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        scratch, results = Path(work, "scratch"), Path(work, "results")
        scratch.mkdir()
        results.mkdir()
        image = cv2.imread(str(IMAGE))
        files = {
            "README crop 220x128 JPEG": ("crop.jpg", cv2.resize(image[1030:1094, 1250:1360], None, fx=2, fy=2)),
            "full 2496x1392 PNG": ("full.png", image),
        }
        for label, (name, pixels) in files.items():
            path = str(scratch / name)
            cv2.imwrite(path, pixels)
            old, new = [], []
            for index in range(-1, args.iterations):  # -1: warm-up (starts the checker child, loads PIL here)
                started = time.perf_counter()
                old_check(path, str(scratch), 64_000_000)
                old.append(time.perf_counter() - started)
                target = results / f"{name}-{index}"
                target.mkdir()
                started = time.perf_counter()
                images, error = collect_images(path, None, False, scratch, target, max_pixels=64_000_000,
                                               max_file_bytes=2**28, max_total_bytes=2**30)  # fmt: skip
                new.append(time.perf_counter() - started)
                assert images and error is None, error
                shutil.rmtree(target)  # as a closed session does; 200 copies of 6 MB left behind would slow the disk
                if index < 0:
                    old, new = [], []
            size = os.path.getsize(path) / 1024
            before, after = statistics.median(old) * 1e3, statistics.median(new) * 1e3
            print(f"{label} ({size:.0f} KiB), median of {args.iterations}: before {before:.3f} ms, after "
                  f"{after:.3f} ms (+{after - before:.3f} ms per returned image)")  # fmt: skip


if __name__ == "__main__":
    main()
