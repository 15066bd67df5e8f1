"""``thyme serve``: the whole agent (model + loop + sandbox) behind an OpenAI-compatible chat endpoint."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from thyme.commands.options import add_loop_arguments, add_model_arguments, agent_config_from_args, shared_backend

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
# Questions answered at once with --endpoint or --scripted (a server batches, a replay costs nothing). A local model
# on transformers answers one at a time (one forward at a time on one device); vLLM batches them.
SHARED_SERVER_RUNNING = 8


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Adds the ``serve`` sub-command."""
    parser = commands.add_parser(
        "serve",
        help="serve the agent as an OpenAI-compatible /v1/chat/completions endpoint",
        description=(
            "Answers OpenAI chat requests (text plus image_url parts) with the whole Thyme agent: the model writes "
            "code, the sandbox runs it, the completion's content is the final answer and the extra 'thyme' field "
            "holds the steps, with crops as URLs on this server. stream=true sends SSE chunks. A non-loopback "
            "--host needs --token-file. API reference: docs/serve.md."
        ),
    )
    add_model_arguments(parser, required=True)
    add_loop_arguments(parser, max_attempts=2, max_attempts_help="attempts before the fallback (2)")
    parser.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on ({DEFAULT_HOST})")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port ({DEFAULT_PORT})")
    parser.add_argument("--token-file", type=Path, metavar="FILE", help="bearer token clients must send (1st line)")
    parser.add_argument("--served-model-name", default="thyme", metavar="NAME", help="model id clients see (thyme)")
    parser.add_argument("--max-running", type=int, metavar="N",
                        help=f"questions at once (1 with --model, else {SHARED_SERVER_RUNNING})")  # fmt: skip
    parser.add_argument("--max-queue", type=int, default=16, metavar="N", help="questions waiting; then 429 (16)")
    parser.add_argument("--queue-wait-s", type=float, default=30.0, help="seconds a question may wait; then 503 (30)")
    parser.add_argument("--max-request-mb", type=float, default=48.0, help="largest request body in MB (48)")
    parser.add_argument("--max-images", type=int, default=8, metavar="N", help="images per question (8)")
    parser.add_argument("--allow-host", dest="allowed_hosts", action="append", default=[], metavar="NAME",
                        help="another Host name clients reach the server by (repeatable)")  # fmt: skip
    parser.add_argument("--request-timeout-s", type=float, default=30.0,
                        help="seconds a request's headers and body may take to arrive (30)")  # fmt: skip
    parser.add_argument("--allow-url-prefix", dest="allowed_url_prefixes", action="append", default=[],
                        metavar="URL", help="prefix of image URLs it may fetch (repeatable)")  # fmt: skip
    parser.add_argument("--allow-root", dest="allowed_roots", action="append", default=[], type=Path,
                        metavar="DIR", help="folder whose images requests may name (repeatable)")  # fmt: skip
    parser.set_defaults(handler=run_serve)


def serve_config(args: argparse.Namespace) -> Any:
    """The :class:`~thyme.serve.config.ServeConfig` of the flags (checked before any model loads)."""
    from thyme.sandbox.server.config import read_token_file
    from thyme.serve.config import ServeConfig

    one_at_a_time = args.model and args.engine == "transformers"  # vLLM batches concurrent questions
    running = args.max_running or (1 if one_at_a_time else SHARED_SERVER_RUNNING)
    return ServeConfig(
        host=args.host,
        port=args.port,
        token=read_token_file(args.token_file) if args.token_file else None,
        model_name=args.served_model_name,
        max_running=running,
        max_queue=args.max_queue,
        queue_wait_s=args.queue_wait_s,
        max_request_bytes=int(args.max_request_mb * 2**20),
        max_images=args.max_images,
        allowed_hosts=args.allowed_hosts,
        request_timeout_s=args.request_timeout_s,
        allowed_url_prefixes=args.allowed_url_prefixes,
        allowed_roots=args.allowed_roots,
    )


def run_serve(args: argparse.Namespace) -> int:
    """Loads the backend, starts the sandbox pool and serves until interrupted."""
    import uvicorn

    from thyme.sandbox import Sandbox
    from thyme.sandbox.server.limits import deadline_protocol
    from thyme.serve.app import create_app, scripted_factory, shared_factory

    config = serve_config(args)
    base_config = agent_config_from_args(args)
    backend = shared_backend(args)  # --engine vllm included
    try:
        with Sandbox(timeout=args.sandbox_timeout_s) as sandbox:
            factory = (
                shared_factory(backend, sandbox) if backend is not None else scripted_factory(args.scripted, sandbox)
            )
            app = create_app(factory, config, base_config)
            auth = "token required" if config.token else "no token"
            print(f"thyme serve: http://{config.host}:{config.port}/v1 as model {config.model_name!r} ({auth}, "
                  f"{config.max_running} at once)", flush=True)  # fmt: skip
            try:
                uvicorn.run(app, host=config.host, port=config.port, log_level="warning",
                            http=deadline_protocol(config.request_timeout_s))  # fmt: skip
            finally:
                app.state.close()
    finally:
        if backend is not None:
            backend.close()
    return 0
