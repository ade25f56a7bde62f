"""fastface serve: an OpenAI-compatible HTTP server with dynamic batching.

    fastface serve [--model DIR] [--host 127.0.0.1] [--port 8000] [--max-batch 16] [--max-wait-ms 10]
                   [--api-key KEY]

``POST /v1/images/generations`` draws faces (OpenAI's images API, with fastface's seed, steps and guidance),
``POST /v1/chat/completions`` answers a question about a face given as a data URL (OpenAI's vision message
format), ``GET /health`` and ``GET /metrics`` (Prometheus) report. Concurrent requests of one task with the same
options decode in one engine call (up to --max-batch rows, the oldest waiting at most --max-wait-ms); a request's
result does not depend on its neighbours: the same seed gives the same PNG bytes alone or among any others.
Listens on 127.0.0.1 unless told otherwise. On SIGINT/SIGTERM it stops accepting, finishes the requests in flight
and exits. The routes and their errors: ``fastface.server.app``; the batching: ``fastface.server.batching``.
"""

from __future__ import annotations

import argparse
import os

from fastface.server.settings import ServerSettings

__all__ = ["ServerSettings", "create_app", "add_arguments", "run"]


def create_app(pipe, settings: ServerSettings | None = None):
    """The ASGI application (FastAPI) serving ``pipe``; see ``fastface.server.app``."""
    from fastface.server.app import create_app as _create

    return _create(pipe, settings)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from fastface.backends import CHOICES
    from fastface.checks import DTYPE_NAMES, WEIGHT_FORMATS, arg_finite_float, arg_positive_int

    defaults = ServerSettings()
    p.add_argument("--model", default=None, help="checkpoint directory (default: the embedded face model)")
    p.add_argument("--backend", default="auto", choices=list(CHOICES), help="kernels (default: auto)")
    p.add_argument("--dtype", default="float32", choices=list(DTYPE_NAMES), help="precision (default: float32)")
    p.add_argument("--weights", default="float", choices=list(WEIGHT_FORMATS),
                   help="attention and expert weights: float, or int8 quantised at load (default: float)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine "
                   "only; 0.0.0.0 exposes the server to the network)")
    p.add_argument("--port", type=arg_positive_int, default=8000, help="TCP port (default: 8000)")
    p.add_argument("--max-batch", type=arg_positive_int, default=defaults.max_batch,
                   help=f"rows (images or answers) per engine call; 1 turns batching off (default: "
                   f"{defaults.max_batch})")
    p.add_argument("--max-wait-ms", type=arg_finite_float, default=defaults.max_wait_ms,
                   help=f"how long the oldest queued request waits for others to join its batch (default: "
                   f"{defaults.max_wait_ms:g})")
    p.add_argument("--max-queue", type=arg_positive_int, default=defaults.max_queue,
                   help=f"rows allowed to wait; past that requests get 429 (default: {defaults.max_queue})")
    p.add_argument("--max-steps", type=arg_positive_int, default=defaults.max_steps,
                   help=f"decoding steps a request may ask for (default: {defaults.max_steps})")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/ routes (default: "
                   "$FASTFACE_API_KEY if set, else no key; prefer the variable: a command line is visible to "
                   "other users of the machine)")
    p.add_argument("--threads", type=arg_positive_int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def run(args) -> int:
    import torch
    import uvicorn

    import fastface

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    api_key = args.api_key if args.api_key is not None else (os.environ.get("FASTFACE_API_KEY") or None)
    if args.port > 65535:
        raise ValueError(f"--port {args.port} is not a TCP port (1..65535)")
    if args.max_wait_ms < 0:
        raise ValueError(f"--max-wait-ms must be >= 0, got {args.max_wait_ms}")
    pipe = fastface.load(args.model, backend=args.backend, dtype=args.dtype, weights=args.weights)
    settings = ServerSettings(model_name=pipe.config.name, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                              max_queue=args.max_queue, max_steps=min(args.max_steps, 1024), api_key=api_key)
    app = create_app(pipe, settings)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=60)
    return 0
