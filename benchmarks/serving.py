"""Serving under concurrent load with mixed sampling options: requests/s, latency and how requests batched.

Starts the real app (``alignx serve``'s Hugging Face backend, the batching worker) on loopback with a run's
experts, then sends ``--requests`` chat completions from ``--threads`` client threads. Every request mixes
options the way real clients do: greedy or sampled (temperature 0.7 / 1.0), top-p 1 or 0.9, seeded or not,
a stop string or not, streamed or not, ``max_tokens`` 4 to 8. All of them may share a batch: the worker
samples each row with its own options (``alignx.serving.decoding``). Bounded in count and in time
(``--time-limit``: requests not sent by then are not sent, and the count says so).

Prints per-request latency p50 / p95, requests/s over the whole load and the batch sizes the server's own
histogram recorded. Last line:
``requests_per_s=<x> p50_s=<x> p95_s=<x> mean_batch=<x> single_batches=<n>/<batches> ok=<n>/<sent>``.

    python benchmarks/serving.py --run runs/demo                  # 120 requests, 12 threads
"""

from __future__ import annotations

import argparse
import json
import math
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from alignx.generate import AlignX
from alignx.serving.app import ServeSettings, create_app, serve_in_thread
from alignx.serving.batcher import Batcher
from alignx.serving.metrics import Metrics

PROMPTS = ("Give three tips for staying healthy.", "What happens if you eat watermelon seeds?",
           "How do I make my neighbour's dog stop barking?", "Name a primary colour.",
           "Write a haiku about the sea.", "Is it safe to mix bleach and ammonia?")


def request_body(i: int) -> dict:
    """The i-th request's options: every combination of the option kinds recurs across the load."""
    body = {"model": "bench", "messages": [{"role": "user", "content": f"{PROMPTS[i % len(PROMPTS)]} ({i})"}],
            "max_tokens": 4 + i % 5, "temperature": (0.0, 0.7, 1.0)[i % 3], "top_p": (1.0, 0.9)[i % 2]}
    if i % 4 == 1:
        body["seed"] = i
    if i % 5 == 2:
        body["stop"] = ["."]
    if i % 3 == 1:
        body["stream"] = True
    return body


def send(url: str, body: dict) -> tuple[bool, float]:
    """(succeeded, seconds to the last byte) of one request."""
    started = time.perf_counter()
    request = urllib.request.Request(f"{url}/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            payload = response.read().decode()
            ok = response.status == 200 and (("data: [DONE]" in payload) if body.get("stream") else "choices" in json.loads(payload))
    except OSError:
        ok = False
    return ok, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/demo")
    parser.add_argument("--method", default="alignx")
    parser.add_argument("--requests", type=int, default=120)
    parser.add_argument("--threads", type=int, default=12)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--batch-wait-ms", type=float, default=10.0)
    parser.add_argument("--time-limit", type=float, default=600.0, help="seconds after which no new request is sent")
    args = parser.parse_args()
    aligner = AlignX.from_run(args.run, method=args.method)
    metrics = Metrics()
    engine = Batcher(aligner, metrics, max_batch_size=args.max_batch_size, wait_ms=args.batch_wait_ms)
    settings = ServeSettings(model_name="bench", max_new_tokens=8)
    print(f"cpu={torch.backends.cpu.get_cpu_capability()} threads={torch.get_num_threads()} run={args.run} "
          f"method={args.method} requests={args.requests} client_threads={args.threads} max_batch={args.max_batch_size}")
    with serve_in_thread(create_app(engine, settings, metrics)) as url:
        send(url, request_body(0))  # warm-up, not counted
        warm_counts, warm_sum = metrics.batch_size.snapshot()
        deadline = time.perf_counter() + args.time_limit

        def one(i: int):
            return send(url, request_body(i)) if time.perf_counter() < deadline else None

        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=args.threads) as pool:
            outcomes = [o for o in pool.map(one, range(args.requests)) if o is not None]
        wall = time.perf_counter() - started
    counts, total = metrics.batch_size.snapshot()
    counts = {bound: n - warm_counts[bound] for bound, n in counts.items()}
    batches = sum(counts.values())
    latency = np.array([seconds for _, seconds in outcomes])
    ok = sum(good for good, _ in outcomes)
    print("batch sizes (server histogram, upper bounds): "
          + ", ".join(f"<={'inf' if math.isinf(b) else int(b)}: {n}" for b, n in counts.items() if n))
    print(f"sent {len(outcomes)} of {args.requests} in {wall:.1f} s; succeeded {ok}")
    print(f"requests_per_s={len(outcomes) / wall:.2f} p50_s={np.percentile(latency, 50):.2f} "
          f"p95_s={np.percentile(latency, 95):.2f} mean_batch={(total - warm_sum) / max(batches, 1):.2f} "
          f"single_batches={counts[1]}/{batches} ok={ok}/{len(outcomes)}")


if __name__ == "__main__":
    main()
