"""Flags that `thyme answer`, `thyme eval` and `thyme demo` share: where the model comes from, and the loop knobs.

One definition keeps the three commands' flag names, defaults and help identical, and maps them onto
:class:`~thyme.config.AgentConfig` in one place. Standard library only at import (see ``thyme.commands``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

DEFAULT_SCRIPTED_HELP = "replay model text from a JSON script"


ENGINES = ("transformers", "vllm")


def add_model_arguments(
    parser: argparse.ArgumentParser, *, required: bool, scripted_help: str = DEFAULT_SCRIPTED_HELP
) -> None:
    """Adds ``--model | --endpoint | --scripted`` (one of them) and ``--model-name``, ``--engine``, ``--device``,
    ``--dtype``."""
    source = parser.add_mutually_exclusive_group(required=required)
    source.add_argument("--model", metavar="ID_OR_PATH", help="hub id (Kwai-Keye/Thyme-RL) or local checkpoint")
    source.add_argument("--endpoint", metavar="URL", help="OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1")
    source.add_argument("--scripted", type=Path, metavar="FILE", help=scripted_help)
    parser.add_argument("--model-name", metavar="NAME", help="model name to request from --endpoint")
    parser.add_argument(
        "--engine",
        choices=ENGINES,
        default="transformers",
        help="what runs --model: transformers (default) or an in-process vLLM engine that batches requests",
    )
    parser.add_argument("--device", help="transformers device: cpu, cuda, cuda:1 or auto (default: cuda if any)")
    parser.add_argument("--dtype", default="auto", help="transformers dtype: auto, bfloat16, float16, float32")


def add_loop_arguments(parser: argparse.ArgumentParser, *, max_attempts: int, max_attempts_help: str) -> None:
    """Adds the rollout-loop flags that :func:`agent_config_from_args` reads (``max_attempts`` differs per command:
    one greedy attempt keeps an evaluation deterministic, a user asking once gets a retry)."""
    parser.add_argument("--max-generation-calls", type=int, default=5, metavar="N", help="calls per attempt (5)")
    parser.add_argument("--max-new-tokens", type=int, default=2048, metavar="N", help="tokens per call (2048)")
    parser.add_argument("--sampling", choices=("greedy", "ats"), default="greedy", help="decoding policy (greedy)")
    parser.add_argument("--max-attempts", type=int, default=max_attempts, metavar="N", help=max_attempts_help)
    parser.add_argument("--no-fallback", action="store_true", help="do not ask the plain fallback prompt")
    parser.add_argument("--hide-sandbox-errors", action="store_true", help="drop failed code blocks (original eval)")
    parser.add_argument(
        "--min-pixels", type=int, metavar="N", help="min pixels per image for the model (default: the model's; 3136)"
    )
    parser.add_argument(
        "--max-pixels",
        type=int,
        metavar="N",
        help="max pixels per image for the model (default: the checkpoint's own limit; 12845056 for Thyme)",
    )
    add_max_input_pixels_argument(parser)
    parser.add_argument("--sandbox-timeout-s", type=float, default=10.0, help="seconds per code block (10)")
    parser.add_argument("--seed", type=int, help="sampling seed")


def add_max_input_pixels_argument(parser: argparse.ArgumentParser) -> None:
    """Adds ``--max-input-pixels``: the one size limit for input images (default 100 MP, AgentConfig's)."""
    parser.add_argument(
        "--max-input-pixels",
        type=int,
        metavar="N",
        help="refuse input images with more pixels than this (default 100000000; about 3 bytes each in memory)",
    )


def with_model_pixel_limits(config: Any, args: argparse.Namespace, backend: Any) -> Any:
    """The config with a local checkpoint's own image pixel limits where no flag set them.

    The Thyme weights' limits are AgentConfig's defaults, but another checkpoint may have its own: the tiny dry-run
    model sees images of at most 256x256 px, and Thyme's 12.8 MP would turn the README photo into ~4800 tokens,
    more than its whole context. A server or a replay has no processor to ask, so the defaults stay.
    """
    import dataclasses

    limits = getattr(backend, "pixel_limits", None)
    if limits is None:
        return config
    min_pixels, max_pixels = limits
    changes = {}
    if args.min_pixels is None:
        changes["min_pixels"] = min_pixels if args.max_pixels is None else min(min_pixels, args.max_pixels)
    if args.max_pixels is None:
        changes["max_pixels"] = max(max_pixels, changes.get("min_pixels", config.min_pixels))
    return dataclasses.replace(config, **changes) if changes else config


def check_model_name(args: argparse.Namespace) -> None:
    """``--model-name`` names a model on a server; with a local or scripted model it would be silently ignored.

    Raises:
        ConfigError: ``--model-name`` was given without ``--endpoint``.
    """
    from thyme.errors import ConfigError

    if args.model_name and not args.endpoint:
        raise ConfigError("--model-name only applies with --endpoint")
    if getattr(args, "engine", "transformers") != "transformers" and not args.model:
        raise ConfigError(f"--engine {args.engine} runs a local model: pass --model (a server is --endpoint)")


def shared_backend(args: argparse.Namespace) -> Any:
    """The one backend a long-running command (demo, serve) shares between questions: ``--endpoint``'s client or
    ``--model`` on ``--engine``; None for ``--scripted``, whose replay is made per question."""
    from thyme.backends import BACKENDS

    check_model_name(args)
    if args.endpoint:
        return BACKENDS["openai"](args.endpoint, model=args.model_name)
    if args.model:
        return load_model_backend(args)
    return None


def load_model_backend(args: argparse.Namespace) -> Any:
    """The backend of ``--model`` on ``--engine`` (transformers, or vLLM in this process)."""
    from thyme.agent import ThymeAgent

    kwargs = {"device": args.device} if args.engine == "transformers" else {}
    # from_pretrained checks the path / hub id and says how to get the weights.
    return ThymeAgent.from_pretrained(args.model, engine=args.engine, dtype=args.dtype, **kwargs).backend


def agent_config_from_args(args: argparse.Namespace, **fields: Any) -> Any:
    """The :class:`~thyme.config.AgentConfig` of the flags added by :func:`add_loop_arguments`, plus ``fields``
    (options only one command has); AgentConfig validates the values and names the bad one."""
    from thyme.config import AgentConfig

    return AgentConfig(
        max_generation_calls=args.max_generation_calls,
        max_new_tokens=args.max_new_tokens,
        sampling=args.sampling,
        seed=args.seed,
        max_attempts=args.max_attempts,
        use_fallback=not args.no_fallback,
        show_sandbox_errors=not args.hide_sandbox_errors,
        sandbox_timeout_s=args.sandbox_timeout_s,
        **{name: getattr(args, name) for name in ("min_pixels", "max_pixels") if getattr(args, name) is not None},
        **({"max_input_pixels": args.max_input_pixels} if args.max_input_pixels is not None else {}),
        **fields,
    )
