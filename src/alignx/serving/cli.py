"""``alignx serve``: a run's experts behind an OpenAI-compatible HTTP API, routed per request.

The server, the model and vLLM are imported inside :func:`run`, as every command-line module does
(:mod:`alignx.cli`): `alignx serve --help` answers without importing torch, and a missing extra is one line.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from alignx.cli import add_base_model_arguments
from alignx.errors import AlignXError


def register(verbs) -> None:
    serve = verbs.add_parser(
        "serve", help="serve a run over an OpenAI-compatible HTTP API with per-request routing",
        description="Serve a run over an OpenAI-compatible HTTP API: POST /v1/chat/completions and /v1/completions "
        "(stream=true for server-sent events), GET /v1/models, /health and /metrics (Prometheus). Every request "
        "is routed by MoCaE (or --method) and its routing comes back in the response's 'alignx' field. Concurrent "
        "requests are decoded together, each with its own expert weights. Chat requests take one user message. "
        "SIGINT/SIGTERM stop accepting requests and finish the ones in flight.",
    )
    serve.add_argument("--run", required=True, help="run directory (with Stage 2 routers for --method alignx)")
    serve.add_argument("--method", default="alignx", help="any method of `alignx generate` (default: alignx)")
    serve.add_argument("--mode", default="router", help="router (default): the router's own mixing weights (stage2.mixing) | soft: mix with the calibrated probabilities (the paper) | top1 | threshold")
    serve.add_argument("--threshold", type=float, default=0.1, help="weight floor of --mode threshold")
    add_base_model_arguments(serve)
    serve.add_argument("--model-name", help="model id of /v1/models and requests (default: the run directory's name)")
    serve.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: loopback only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", default=os.environ.get("ALIGNX_API_KEY"),
                       help="require 'Authorization: Bearer <key>' on /v1 (default: $ALIGNX_API_KEY; none: no auth)")
    serve.add_argument("--max-prompt-tokens", type=int, default=2048, help="longer prompts get a 400")
    serve.add_argument("--max-new-tokens", type=int, default=512,
                       help="most tokens a request may ask for (max_tokens), and its default")
    serve.add_argument("--max-batch-size", type=int, default=8, help="requests decoded together")
    serve.add_argument("--batch-wait-ms", type=float, default=10.0, help="how long to gather a batch")
    serve.add_argument("--max-queue", type=int, default=256, help="waiting requests beyond this get a 503")
    serve.add_argument("--backend", choices=("hf", "vllm"), default="hf",
                       help="hf: this process decodes, batching requests (default); vllm: vLLM's multi-LoRA engine")
    serve.add_argument("--merged-adapters", type=int, default=16,
                       help="vllm: merged soft-routing adapters kept on disk (LRU)")
    serve.add_argument("--shutdown-timeout", type=float,
                       help="seconds to wait for the requests in flight on shutdown, then drop them (default: no limit)")
    serve.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from alignx.serving.app import ServeSettings, create_app
    except ImportError as exc:
        raise AlignXError(f"alignx serve needs FastAPI and uvicorn ({exc.name} is missing): pip install 'alignx[serve]'") from None
    from alignx.serving.metrics import Metrics

    if not 0 <= args.port < 65536:
        raise AlignXError(f"--port must be in 0..65535, got {args.port}")
    settings = ServeSettings(
        model_name=args.model_name or Path(args.run).resolve().name, api_key=args.api_key,
        max_prompt_tokens=args.max_prompt_tokens, max_new_tokens=args.max_new_tokens,
        shutdown_timeout=args.shutdown_timeout,
    )
    metrics = Metrics()
    engine = build_engine(args, metrics)
    print(f"[serve] {settings.model_name} ({args.method}, {args.backend}) on http://{args.host}:{args.port}/v1"
          + (" with API key" if settings.api_key else " without authentication"), flush=True)
    uvicorn.run(create_app(engine, settings, metrics), host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=args.shutdown_timeout)
    return 0


def build_engine(args: argparse.Namespace, metrics):
    """The backend that decodes: this process's batching worker, or vLLM."""
    from alignx.generate import AlignX

    if args.backend == "vllm":  # fail before the model loads when vLLM is not installed
        from alignx.serving.vllm_backend import import_vllm

        import_vllm()
    aligner = AlignX.from_run(args.run, method=args.method, mode=args.mode, floor=args.threshold, model=args.model,
                              trust_remote_code=args.trust_remote_code)
    if args.backend == "vllm":
        from alignx.serving.vllm_backend import VLLMEngine

        return VLLMEngine(aligner, metrics, max_queue=args.max_queue, merged_adapters=args.merged_adapters)
    from alignx.serving.batcher import Batcher

    return Batcher(aligner, metrics, max_batch_size=args.max_batch_size, wait_ms=args.batch_wait_ms,
                   max_queue=args.max_queue)
