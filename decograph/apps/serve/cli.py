"""``decograph serve``: the parser (standard library only, so ``decograph --help`` stays light)
and the command (uvicorn; SIGTERM or Ctrl-C stop taking requests and let the ones in flight
finish within ``--grace`` seconds)."""
from __future__ import annotations

import argparse
import signal
import sys
from typing import Any

from decograph.errors import InputError

__all__ = ["add_parser", "serve"]


def add_parser(sub: Any) -> None:
    s = sub.add_parser("serve", help="an OpenAI-compatible HTTP server with continuous batching",
                       description="Serve a model with a decoding strategy over an OpenAI-compatible API "
                                   "(/v1/completions, /v1/chat/completions, /v1/models, /health, /metrics). "
                                   "Requests join the running batch at the next step; greedy requests get exactly "
                                   "the tokens they would get alone. Without --model or --exported: the embedded "
                                   "default model (SmolLM2-135M-Instruct) with anpd. A request's temperature "
                                   "omitted or 0 decodes with the strategy as written (greedy for the lossless "
                                   "built-ins); above 0, its lossless speculative sampling.")
    src = s.add_mutually_exclusive_group()
    src.add_argument("--model", metavar="DIR_OR_ID", help="a Hugging Face causal-LM directory or Hub id (local cache)")
    src.add_argument("--exported", metavar="DIR", help="a decoder written by `decograph export` (no torch is loaded)")
    s.add_argument("--strategy", metavar="NAME_OR_FILE",
                   help="a built-in name or a strategy file (default: anpd; with --exported: the exported one)")
    s.add_argument("--backend", default="torch", metavar="NAME", help="with --model or the default model: the "
                   "backend (default: torch; e.g. onnxruntime-int4)")
    s.add_argument("--served-model-name", metavar="NAME", help="the model id clients send (default: the model's)")
    s.add_argument("--host", default="127.0.0.1", help="default: 127.0.0.1")
    s.add_argument("--port", type=int, default=8000, help="default: 8000 (0: any free port, printed)")
    s.add_argument("--max-batch", type=int, default=16, metavar="N", help="most rows decoded at once (default: 16)")
    s.add_argument("--prefill-tokens", type=int, default=512, metavar="N",
                   help="most prompt tokens a step admits into the running batch (at least one request; 0: no "
                        "limit), so a burst's prompt forwards spread over the batch's steps (default: 512)")
    s.add_argument("--threads", type=int, default=None, metavar="N", help="compute threads (default: the backend's)")
    s.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="serve as a Ray Serve deployment (Ray's HTTP proxy in front) on the cluster at ADDRESS "
                        "(none: a local Ray instance)")
    s.add_argument("--replicas", type=int, default=1, metavar="N", help="with --ray: replicas, one decoder each")
    s.add_argument("--grace", type=float, default=30.0, metavar="S",
                   help="on SIGTERM, seconds in-flight requests get to finish (default: 30)")
    s.set_defaults(func=serve)


def serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from decograph.apps.serve.app import create_app
    except ImportError as e:
        raise InputError(f"decograph serve needs the serving extra ({e.name} is missing): "
                         "pip install 'decograph[serve]'") from None
    from decograph.apps.serve.models import load_served

    if args.max_batch < 1:
        raise InputError(f"--max-batch must be >= 1, got {args.max_batch}")
    if args.prefill_tokens < 0:
        raise InputError(f"--prefill-tokens must be >= 0, got {args.prefill_tokens}")
    if not 0 <= args.port <= 65535:
        raise InputError(f"--port must be in 0..65535, got {args.port}")
    if args.ray is not None:
        from decograph.apps.serve.scale import serve_on_ray

        if args.port == 0:
            raise InputError("--ray needs a fixed --port (Ray's HTTP proxy binds it)")
        options = {"model": {"model": args.model, "exported": args.exported, "strategy": args.strategy,
                             "backend": args.backend, "name": args.served_model_name, "threads": args.threads},
                   "max_batch": args.max_batch, "grace": args.grace, "prefill_tokens": args.prefill_tokens}
        return serve_on_ray(args.ray or None, args.replicas, options, args.host, args.port)
    if args.replicas != 1:
        raise InputError("--replicas needs --ray (one process serves one decoder)")
    print(f"decograph serve: loading {args.exported or args.model or 'the embedded default model'} ...",
          file=sys.stderr, flush=True)
    served = load_served(model=args.model, exported=args.exported, strategy=args.strategy, backend=args.backend,
                         name=args.served_model_name, threads=args.threads)
    app = create_app(served, max_batch=args.max_batch, grace_s=args.grace, prefill_tokens=args.prefill_tokens)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="info",
                            timeout_graceful_shutdown=max(1, int(args.grace)))
    server = uvicorn.Server(config)
    print(f"decograph serve: model {served.name!r}, continuous batching "
          f"{'on' if served.continuous else 'off (this strategy forks or unmasks: one request at a time)'}",
          file=sys.stderr, flush=True)
    # uvicorn handles SIGTERM (stop taking requests, finish the ones in flight), then raises it
    # again under the handler it found: this one, so a drained server exits with status 0.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        server.run()
    finally:
        print("decograph serve: stopped", file=sys.stderr, flush=True)
    return 0
