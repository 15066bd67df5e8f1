"""Sandbox cost at RL scale: worker start, many one-shot sessions at once, and the pool's memory.

For each start method (``exec``: a new interpreter per worker inside its own bubblewrap; ``zygote``: workers forked
from one warm process), measured side by side in one run:

1. worker start: wall time and CPU time per worker (the worker's own CPU from /proc, plus what the zygote spent
   forking it), starting workers one after another;
2. N concurrent one-shot ``Sandbox.run`` calls of the README example (threads, a small warm pool: most sessions get
   a worker started on demand), against a serial in-process loop of the same OpenCV calls: throughput ratio;
3. resident memory of the pool holding 1, 16 and 64 idle workers, as PSS (shared pages counted once) summed over
   the workers, the zygote and bubblewrap's processes.

    python benchmarks/sandbox_scale.py [--methods exec zygote] [--concurrency 64] [--pss 1 16 64]

``exec`` at 64 workers holds 64 interpreters (~5 GB): pass ``--exec-max 16`` (the default) on a shared machine.
"""

from __future__ import annotations

import argparse
import inspect
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sandbox_overhead import CODE, IMAGE, raw_ops  # noqa: E402 - the same example and raw ops

from thyme.sandbox import Sandbox  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of one process so far."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            for line in rollup:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it."""
    found, queue = [], [pid]
    while queue:
        current = queue.pop()
        found.append(current)
        try:
            tasks = os.listdir(f"/proc/{current}/task")
        except FileNotFoundError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{current}/task/{task}/children") as children:
                    queue.extend(int(child) for child in children.read().split())
            except FileNotFoundError:
                pass
    return found


def make_sandbox(method: str, pool_size: int) -> Sandbox:
    if "start_method" in inspect.signature(Sandbox.__init__).parameters:
        return Sandbox(timeout=60, pool_size=pool_size, start_method=method)
    return Sandbox(timeout=60, pool_size=pool_size)  # a checkout from before the zygote: exec only


def worker_start(method: str, count: int) -> tuple[float, float]:
    """Median wall and CPU seconds per started worker."""
    with make_sandbox(method, 0) as sandbox:
        walls, cpus = [], []
        for index in range(count + 1):
            zygote = getattr(sandbox, "_zygote", None)
            zygote_cpu = cpu_seconds(zygote.pid) if zygote is not None else 0.0
            start = time.perf_counter()
            worker = sandbox._start_worker()
            wall = time.perf_counter() - start
            cpu = cpu_seconds(worker.pid) + (cpu_seconds(zygote.pid) - zygote_cpu if zygote is not None else 0.0)
            worker.kill()
            if index:  # the first one also started the zygote: reported apart
                walls.append(wall)
                cpus.append(cpu)
            else:
                first = wall
        print(f"  {method:7s} worker start: median wall {statistics.median(walls) * 1000:8.1f} ms, "
              f"CPU {statistics.median(cpus) * 1000:8.1f} ms per worker (first one {first * 1000:.0f} ms)")
        return statistics.median(walls), statistics.median(cpus)


def concurrent_one_shots(method: str, concurrency: int, raw_s: float) -> None:
    with make_sandbox(method, 2) as sandbox:
        sandbox.wait_ready()
        sandbox.run(CODE, str(IMAGE))  # warm caches
        sandbox.wait_ready()
        start = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            results = list(pool.map(lambda _: sandbox.run(CODE, str(IMAGE)), range(concurrency)))
        wall = time.perf_counter() - start
        assert all(result.ok for result in results), [result.error for result in results if not result.ok][:3]
    print(f"  {method:7s} {concurrency} concurrent one-shot runs: {wall:6.2f} s "
          f"({concurrency / wall:5.1f}/s) vs serial in-process {raw_s:5.2f} s ({concurrency / raw_s:5.1f}/s): "
          f"throughput ratio {raw_s / wall:.2f}x")


def pool_pss(method: str, counts: list[int]) -> None:
    with make_sandbox(method, 0) as sandbox:
        held = []
        for count in counts:
            while len(held) < count:
                held.append(sandbox._start_worker())
            roots = [worker.process.pid for worker in held if worker.process.pid > 0]
            zygote = getattr(sandbox, "_zygote", None)
            pids = set()
            for root in roots + ([zygote.process.pid] if zygote is not None else []):
                pids.update(descendants(root))
            if zygote is not None:
                pids.update(descendants(zygote.process.pid))
            total = sum(pss_kib(pid) for pid in pids)
            print(f"  {method:7s} pool of {count:3d} idle workers: PSS {total / 1024:8.1f} MiB "
                  f"({total / 1024 / count:6.1f} MiB per worker, {len(pids)} processes)")
        for worker in held:
            worker.kill()


def main() -> None:
    if os.environ.get("OMP_NUM_THREADS") != "1":
        os.execve(sys.executable, [sys.executable, *sys.argv], dict(os.environ, OMP_NUM_THREADS="1"))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["exec", "zygote"])
    parser.add_argument("--starts", type=int, default=5, help="workers started per method for the start timing")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--pss", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--exec-max", type=int, default=16, help="cap on concurrent/held exec workers (memory)")
    args = parser.parse_args()
    import cv2

    cv2.setNumThreads(1)
    with tempfile.TemporaryDirectory() as out_dir:
        raw_ops(out_dir)
        start = time.perf_counter()
        for _ in range(args.concurrency):
            raw_ops(out_dir)
        raw_s = time.perf_counter() - start
    print("worker start (one after another):")
    for method in args.methods:
        worker_start(method, args.starts)
    print("concurrent one-shot sessions (README example):")
    for method in args.methods:
        concurrency = min(args.concurrency, args.exec_max) if method == "exec" else args.concurrency
        concurrent_one_shots(method, concurrency, raw_s * concurrency / args.concurrency)
    print("pool memory:")
    for method in args.methods:
        pool_pss(method, [count for count in args.pss if method != "exec" or count <= args.exec_max])


if __name__ == "__main__":
    main()
