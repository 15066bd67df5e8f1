"""``thyme demo``: the Gradio chat; with no model flag it replays the original README example, so it always starts."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from thyme.commands.options import add_max_input_pixels_argument, add_model_arguments, shared_backend

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
# Questions answered at once with --endpoint or a replay (the server batches; a replay costs nothing). A local model
# answers one at a time: two generate calls on one GPU would only compete for its memory.
SHARED_SERVER_CONCURRENCY = 8


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Adds the ``demo`` sub-command."""
    parser = commands.add_parser(
        "demo",
        help="open the Gradio chat: upload an image, ask, watch the model think with code",
        description=(
            "Starts a web chat where the model reasons about an uploaded image, writes Python that the sandbox runs, "
            "sees its crops and answers. Choose the model with --model (hub id or local checkpoint, transformers), "
            "--endpoint (an OpenAI-compatible server such as vLLM) or --scripted (replay recorded model text). "
            "With none of them the demo replays the original README example (no weights, no GPU)."
        ),
    )
    add_model_arguments(
        parser, required=False, scripted_help="replay model text from a JSON script (default: README example)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=2048, metavar="N", help="tokens per call (2048)")
    parser.add_argument("--sandbox-timeout-s", type=float, default=10.0, help="seconds per code block (10)")
    parser.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default: {DEFAULT_HOST})")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT})")
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    add_max_input_pixels_argument(parser)
    parser.set_defaults(handler=run_demo)


def _build_backend(args: argparse.Namespace) -> Any:
    """The shared backend for --model / --endpoint (None for a scripted replay, which is made per question)."""
    return shared_backend(args)


def _description(args: argparse.Namespace, script: Path) -> str:
    if args.endpoint:
        return f"Model served at `{args.endpoint}`."
    if args.model:
        return f"Model `{args.model}` ({args.engine})."
    from thyme.ui.app import scripted_description

    return scripted_description(script)


def run_demo(args: argparse.Namespace) -> int:
    """Loads the backend, starts the sandbox and serves the demo until interrupted."""
    from thyme.config import AgentConfig
    from thyme.errors import ConfigError
    from thyme.sandbox import Sandbox
    from thyme.ui.app import (
        EXAMPLES_DIR,
        README_SCRIPT,
        build_demo,
        readme_example,
        scripted_agent_factory,
        shared_agent_factory,
    )

    check_port_free(args.host, args.port)  # before a model load that can take minutes
    limits = {"max_input_pixels": args.max_input_pixels} if args.max_input_pixels is not None else {}
    base_config = AgentConfig(max_new_tokens=args.max_new_tokens, sandbox_timeout_s=args.sandbox_timeout_s, **limits)
    backend = _build_backend(args)
    if args.model:  # the checkpoint's own image limits (the tiny dry-run model's are far below Thyme's 12.8 MP)
        min_pixels, max_pixels = backend.pixel_limits
        base_config = dataclasses.replace(base_config, min_pixels=min_pixels, max_pixels=max_pixels)
    script = args.scripted or README_SCRIPT
    with Sandbox(timeout=args.sandbox_timeout_s) as sandbox:
        if backend is None:
            factory = scripted_agent_factory(script, sandbox)
        else:
            factory = shared_agent_factory(backend, sandbox)
        demo = build_demo(
            factory,
            base_config=base_config,
            examples=[readme_example()],
            description=_description(args, script),
            # A transformers model answers one question at a time; vLLM and servers batch concurrent ones.
            concurrency_limit=1 if args.model and args.engine == "transformers" else SHARED_SERVER_CONCURRENCY,
        )
        try:
            try:
                # quiet: Gradio's own lines speak of launch() arguments (`share=True`, `server_port`), not our flags.
                demo.queue().launch(
                    server_name=args.host,
                    server_port=args.port,
                    share=args.share,
                    allowed_paths=[str(EXAMPLES_DIR)],
                    quiet=True,
                    prevent_thread_lock=True,
                )
            except OSError as exc:  # the port was taken between our check and Gradio's bind
                raise ConfigError(_port_in_use(args.host, args.port)) from exc
            print(ready_message(demo.local_url, demo.share_url, args.share), flush=True)
            demo.block_thread()  # until Ctrl+C
        finally:
            if backend is not None:
                backend.close()
    return 0


def ready_message(local_url: str, share_url: str | None, share: bool) -> str:
    """The startup line, in the demo's own flags."""
    message = f"thyme demo: open {local_url} (Ctrl+C stops it)"
    if share_url:
        return message + f"; public link: {share_url}"
    if share:
        return message + "; the public link could not be made (see above)"
    return message + "; --share adds a public gradio.live link"


def _port_in_use(host: str, port: int) -> str:
    return f"port {port} on {host} is in use (another `thyme demo`?): stop that program or pass --port {port + 1}"


def check_port_free(host: str, port: int) -> None:
    """Refuses a port that is taken, in the demo's terms (Gradio would say "set server_port in launch()").

    Raises:
        ConfigError: the port is in use or may not be bound.
    """
    import errno
    import socket

    from thyme.errors import ConfigError

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ConfigError(f"--host {host}: not an address of this machine ({exc.strerror})") from exc
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no conflict
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(_port_in_use(host, port)) from exc
            message = f"cannot listen on {host}:{port}: {exc.strerror}; pass another --host or --port"
            raise ConfigError(message) from exc
