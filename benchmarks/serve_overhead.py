"""What ``thyme serve`` costs over calling the agent in-process, and what concurrent clients gain, side by side.

Every answer replays the README example (two model calls, one real sandbox run that crops and zooms the 2496x1392
photo), so the time is the loop plus the sandbox, not a model. Three runs of ``--n`` answers each, in one process:

1. in-process: ``ThymeAgent.answer`` in a loop (the baseline);
2. served, one client: the same answers through ``POST /v1/chat/completions`` on loopback (the image sent as a
   base64 data URL, the answer and steps back as JSON), one request at a time;
3. served, ``--clients`` clients at once against ``--clients`` slots.

    python benchmarks/serve_overhead.py              # 12 answers, 4 clients
    python benchmarks/serve_overhead.py --n 24 --clients 8

Prints the milliseconds per answer of each run and the ratios served/in-process and one-client/many-clients.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

import thyme

EXAMPLES = Path(thyme.__file__).parent / "data" / "examples"
SCRIPT, IMAGE = EXAMPLES / "readme_17127.json", EXAMPLES / "17127.jpg"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=12, help="answers per run (12)")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients in run 3 (4)")
    args = parser.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.fixtures.openai_server import serve
    from thyme.agent import ThymeAgent
    from thyme.backends.scripted import ScriptedBackend
    from thyme.config import AgentConfig
    from thyme.sandbox import Sandbox
    from thyme.serve.app import create_app, scripted_factory
    from thyme.serve.config import ServeConfig

    question = json.loads(SCRIPT.read_text())["question"]
    config = AgentConfig(max_attempts=1)
    url = "data:image/jpeg;base64," + base64.b64encode(IMAGE.read_bytes()).decode()
    body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": question}]}]}  # fmt: skip
    with Sandbox(timeout=30) as sandbox:
        ThymeAgent(ScriptedBackend(SCRIPT), config, sandbox=sandbox).answer(IMAGE, question)  # warm the workers
        started = time.perf_counter()
        for _ in range(args.n):
            assert ThymeAgent(ScriptedBackend(SCRIPT), config, sandbox=sandbox).answer(IMAGE, question).has_answer
        local = (time.perf_counter() - started) / args.n

        app = create_app(scripted_factory(SCRIPT, sandbox), ServeConfig(max_running=args.clients), config)
        with serve(app) as root, httpx.Client(timeout=300) as client:

            def ask(_: int) -> None:
                reply = client.post(root + "/v1/chat/completions", json=body)
                assert reply.status_code == 200 and reply.json()["thyme"]["code_runs"] == 1, reply.text

            ask(0)
            started = time.perf_counter()
            for index in range(args.n):
                ask(index)
            served = (time.perf_counter() - started) / args.n
            started = time.perf_counter()
            with ThreadPoolExecutor(args.clients) as pool:
                list(pool.map(ask, range(args.n)))
            concurrent = (time.perf_counter() - started) / args.n
        app.state.close()
    print(f"in-process:            {1000 * local:7.1f} ms per answer")
    print(f"served, 1 client:      {1000 * served:7.1f} ms per answer  ({served / local:.2f}x in-process)")
    print(f"served, {args.clients} clients:     {1000 * concurrent:7.1f} ms per answer  "
          f"({served / concurrent:.2f}x faster than 1 client)")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
