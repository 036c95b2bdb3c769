"""A soak of the server on loopback: many clients, a third of them leaving at random points, and afterwards nothing
broken, nothing wasted and nothing leaked.

Starts the real app (``alignx serve``'s Hugging Face backend, the batching worker) on loopback and sends
``--requests`` chat completions from ``--clients`` client threads. Each request mixes what clients send: streamed or
not, greedy or sampled (temperature 0.7 to 1.2, top-p 1 or 0.9, always with a seed), a stop string or not,
``max_tokens`` 4 to 32, and one of eight prompts, each with its own route. ``--leave`` of them (a third) go away at a
random point: while sending the body, just after it (waiting in the queue or being routed), a while later (mostly
while decoding), or after a few events of a stream. The others read their answers in full. Then:

* **server errors**: 5xx responses and error events seen by the clients, the server's own count of 5xx, and the
  error lines it logged (a client leaving must not log a traceback);
* **incomplete**: answers of clients that stayed without a finish reason (and ``[DONE]`` for a stream), or unequal
  to the same request's answer alone: each is sent again afterwards, one at a time, and compared (the seed makes
  a sampled answer reproducible);
* **wasted steps**: the server's count of decode steps that began after a row's client had gone, beyond the first
  (which may have begun as it left: ``alignx_wasted_decode_steps_total``);
* **memory**: the process's resident set after the load (once freed memory is handed back), less what it was after
  a warm-up load of the same kind; and no request object outlives its request.

Without ``--run`` it serves a tiny random Llama (fp32, 4 layers, word-level tokenizer) with random experts and a
random router, so the whole soak takes about a minute on CPU; with ``--run`` a run's own experts and router, at the
run's precision (under bf16, answers equal their solo answers only at ``--max-batch-size 1``: see docs/serving.md).
Either way MoCaE's out-of-distribution gate is opened, so that each prompt gets a route of its own (a random or
briefly trained router flags most prompts, and the gate's fallback weights are the same for all). The resident set
is Linux's (``/proc/self/status``).

Last line: ``requests=<n> server_errors=<n> incomplete=<n> wasted_steps=<n> rss_growth_mib=<x>``; the exit status is
1 when any check fails (any count above 0, a request object left, or a resident set grown by over 16 MiB: a tiny
model's KV caches are kilobytes, so it is the request objects that would show a leak).

    python benchmarks/soak.py                          # 200 requests, 16 clients, a third leave
    python benchmarks/soak.py --run runs/demo --requests 100
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import http.client
import json
import logging
import random
import re
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from common import PROMPTS, random_experts, synthetic_router
from efficiency import SHAPES, word_tokenizer

from alignx.axes import AXES
from alignx.config import ModelConfig
from alignx.generate import AlignX
from alignx.mixing import MixtureOfExperts
from alignx.models.loading import LoadedModel
from alignx.serving.app import ServeSettings, create_app, serve_in_thread
from alignx.serving.batcher import Batcher
from alignx.serving.metrics import Metrics
from alignx.serving.requests import GenerationRequest

PATH = "/v1/chat/completions"
LEAVES = ("body", "early", "late", "stream")  # where a client that leaves goes away
MiB = 2**20


@dataclass(frozen=True)
class Plan:
    """One request: its body, and where its client leaves (None: it stays for the whole answer)."""

    body: dict
    leave: str | None = None
    after: float = 0.0  # seconds (early, late) or events (stream) before it leaves


@dataclass
class Outcome:
    status: int | None = None  # None: the client left before a status
    text: str = ""
    complete: bool = False
    server_error: bool = False


def plans(count: int, leave_fraction: float, rng: random.Random) -> list[Plan]:
    """``count`` requests mixing every option; ``leave_fraction`` of them, at random, leave at a random point."""
    out = []
    for _ in range(count):
        temperature = rng.choice((0.0, 0.0, 0.7, 1.0, 1.2))
        body = {"model": "soak", "messages": [{"role": "user", "content": rng.choice(PROMPTS)}],
                "max_tokens": rng.randint(4, 32), "temperature": temperature, "top_p": rng.choice((1.0, 0.9)),
                "stream": rng.random() < 0.5}
        if temperature > 0:
            body["seed"] = rng.randrange(2**31)
        if rng.random() < 0.3:
            body["stop"] = [rng.choice(("the", "sea", "is"))]
        if rng.random() >= leave_fraction:
            out.append(Plan(body))
            continue
        leave = rng.choice(LEAVES if body["stream"] else LEAVES[:3])
        after = {"body": 0.01, "early": rng.uniform(0, 0.01), "late": rng.uniform(0.02, 0.3),
                 "stream": rng.randint(1, 6)}[leave]
        out.append(Plan(body, leave, after))
    return out


def exchange(address: tuple[str, int], plan: Plan) -> Outcome:
    """Send one request as its plan says, reading the answer in full unless the client leaves."""
    data = json.dumps(plan.body).encode()
    connection = http.client.HTTPConnection(*address, timeout=300)
    try:
        if plan.leave == "body":
            connection.putrequest("POST", PATH)
            connection.putheader("Content-Type", "application/json")
            connection.putheader("Content-Length", str(len(data)))
            connection.endheaders(data[: len(data) // 2])
            time.sleep(plan.after)
            return Outcome()
        connection.request("POST", PATH, data, {"Content-Type": "application/json"})
        if plan.leave in ("early", "late"):
            time.sleep(plan.after)
            return Outcome()
        response = connection.getresponse()
        if response.status != 200:
            response.read()
            return Outcome(response.status, server_error=response.status >= 500)
        if not plan.body["stream"]:
            choice = json.loads(response.read())["choices"][0]
            return Outcome(200, choice["message"]["content"], choice["finish_reason"] in ("stop", "length"))
        return read_stream(response, plan)
    finally:
        connection.close()


def read_stream(response, plan: Plan) -> Outcome:
    outcome, events, finished = Outcome(200), 0, False
    for line in response:
        if not line.startswith(b"data: "):
            continue
        payload = line[len(b"data: "):].strip()
        if payload == b"[DONE]":
            outcome.complete = finished
            return outcome
        chunk = json.loads(payload)
        if "error" in chunk:
            outcome.server_error = True
            return outcome
        for choice in chunk["choices"]:
            outcome.text += choice["delta"].get("content") or ""
            finished = finished or choice["finish_reason"] in ("stop", "length")
        events += 1
        if plan.leave == "stream" and events >= plan.after:
            return Outcome()
    return outcome  # the stream ended without [DONE]: incomplete


class ErrorLog(logging.Handler):
    """Counts the server's error lines (a traceback is a server error even when the client got an answer)."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1


def resident_mib() -> float:
    """The resident set once the garbage is collected and the allocator's free memory handed back."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return int(re.search(r"^VmRSS:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1)) / 1024


def tiny_aligner(directory: Path) -> AlignX:
    """A tiny random Llama in fp32 with random experts and a random router, as ``alignx serve`` would hold them."""
    config = LlamaConfig(**SHAPES["tiny"])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval().requires_grad_(False)
    loaded = LoadedModel(model, word_tokenizer(config.vocab_size), "random:tiny", "", config.num_hidden_layers,
                         torch.float32)
    mixture = MixtureOfExperts.attach(model, random_experts(model, directory / "experts"), AXES)
    router = synthetic_router(config.hidden_size, bank_size=1000, layers=(2, 3))
    return AlignX(None, loaded, mixture, "alignx", ModelConfig(precision="fp32"), router=router)


def run_load(address, load: list[Plan], clients: int) -> list[Outcome]:
    with ThreadPoolExecutor(max_workers=clients) as pool:
        return list(pool.map(lambda plan: exchange(address, plan), load))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="a run directory (default: a tiny random model with random experts)")
    parser.add_argument("--method", default="alignx")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--leave", type=float, default=1 / 3, help="the share of clients that leave early")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--batch-wait-ms", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        aligner = AlignX.from_run(args.run, method=args.method) if args.run else tiny_aligner(Path(tmp))
    if aligner.router is not None:
        aligner.router.config = dataclasses.replace(aligner.router.config, ood_alpha=0.0)  # a route per prompt
    logged = ErrorLog()
    metrics = Metrics()
    engine = Batcher(aligner, metrics, max_batch_size=args.max_batch_size, wait_ms=args.batch_wait_ms)
    settings = ServeSettings(model_name="soak", max_new_tokens=32, max_prompt_tokens=512)
    print(f"cpu={torch.backends.cpu.get_cpu_capability()} threads={torch.get_num_threads()} "
          f"model={args.run or 'tiny random'} precision={aligner.precision.precision} requests={args.requests} "
          f"clients={args.clients} leave={args.leave:.2f} max_batch={args.max_batch_size}", flush=True)
    with serve_in_thread(create_app(engine, settings, metrics)) as url:
        for name in ("uvicorn.error", "alignx.serving"):  # once uvicorn has configured its loggers
            logging.getLogger(name).addHandler(logged)
        host, port = url.removeprefix("http://").split(":")
        address = (host, int(port))
        run_load(address, plans(max(args.requests // 4, args.clients), args.leave, rng), args.clients)  # warm-up
        before = resident_mib()
        started, (warm_counts, warm_sum) = time.perf_counter(), metrics.batch_size.snapshot()
        load = plans(args.requests, args.leave, rng)
        outcomes = run_load(address, load, args.clients)
        wall = time.perf_counter() - started
        counts, total = metrics.batch_size.snapshot()
        batches = sum(counts.values()) - sum(warm_counts.values())
        stayed = [(plan, outcome) for plan, outcome in zip(load, outcomes) if plan.leave is None]
        alone = [exchange(address, plan) for plan, _ in stayed]  # each request again, alone on the server
        after = resident_mib()
    gc.collect()
    with warnings.catch_warnings():  # isinstance() on some of torch's objects warns of deprecations
        warnings.simplefilter("ignore")
        live = sum(isinstance(o, GenerationRequest) for o in gc.get_objects())  # once the server has stopped
    server_errors = sum(o.server_error for o in outcomes) + logged.count + sum(
        float(v) for v in re.findall(r'^alignx_requests_total{endpoint="[^"]*",status="5\d\d"} (\S+)$',
                                     metrics.render(), re.M))
    incomplete = sum(not o.complete for _, o in stayed)
    differ = sum(o.complete and (o.text != a.text or not a.complete) for (_, o), a in zip(stayed, alone))
    wasted = metrics.wasted_steps.value()
    departed = len(load) - len(stayed)
    print(f"sent {len(load)} in {wall:.1f} s ({len(load) / wall:.1f} requests/s): {len(stayed)} stayed, {departed} "
          f"left ({', '.join(f'{k}: {sum(p.leave == k for p in load)}' for k in LEAVES)}); the server dropped "
          f"{metrics.cancelled_requests.value():.0f} request(s) whose client had gone")
    print(f"departed={departed} differ_from_solo={differ} live_requests={live} "
          f"mean_batch={(total - warm_sum) / max(batches, 1):.2f} rss_before_mib={before:.1f} rss_after_mib={after:.1f}")
    growth = after - before
    print(f"requests={len(load)} server_errors={server_errors:.0f} incomplete={incomplete + differ} "
          f"wasted_steps={wasted:.0f} rss_growth_mib={growth:.1f}")
    return int(bool(server_errors or incomplete or differ or wasted or live or growth > 16))


if __name__ == "__main__":
    sys.exit(main())
