"""Efficiency of AlignX against the dense token-level MoE (METHOD.md §6): latency and memory, one run.

Methods, on the same prompts, batch sizes 1 and 8, and dtype (bf16 where the device supports it):

* ``base``: the base model alone, the floor;
* ``alignx-soft`` / ``alignx-top1``: base + three r=16 LoRA experts on all seven projections, with per-prompt
  weights (MoCaE's routing of each prompt with ``--run``, else fixed distinct random rows). A batch of one
  shares one weight vector, so it is merged into the base weights once and decodes at base speed; a batch
  of 8 prompts with different weights runs the unmerged low-rank path;
* ``merge-linear``: the three task vectors averaged and merged (one vector for every prompt);
* ``moe-dense``: every decoder MLP replaced by three dense expert FFNs with a top-2 token router;
* ``peft-top1``: the peer a PEFT user would run instead, the same three experts loaded as PEFT adapters of one
  ``PeftModel``, each prompt sent to its top-1 expert in one mixed batch through ``generate(adapter_names=...)``
  (PEFT's mixed-adapter batch inference), against ``alignx-top1`` on the same prompts and weights;
* ``peft-arrow``: PEFT's Arrow router over the same experts (per-token soft mixing, fp32: see
  :mod:`alignx.baselines.arrow`), against ``alignx-soft``; reported, no target, and left out of ``--quick``.

Per method and batch: prefill latency (a one-token generation), decode time per token (greedy, a fixed
number of new tokens with EOS disabled, excluding the prefill), peak memory, and the one-off costs per
batch: the router (partial prefill + MoCaE, alignx only) and setting the batch's expert weights (a merge
where they are shared). Experts, dense FFNs and routers are the trained ones of ``--run``, else random of
the same shapes (what they cost does not depend on their values), made once by the parent and loaded from
files by the workers, as ``alignx generate`` loads trained ones.

How it measures
---------------
* Each group of methods runs in its own worker process (this script with ``--worker``), and only one worker
  computes at a time. Methods that hold the same weights while decoding share a worker: base; the merged
  ones (alignx at batch 1, merge-linear); alignx at batch 8 (per-example weights); moe-dense.
* Peak memory is per run, reset before each: on a GPU ``torch.cuda.max_memory_allocated``; on CPU the
  process's resident-set high-water mark (reset through ``/proc/self/clear_refs``) less its resident set
  before any model was built, i.e. without the interpreter and libraries that every method loads alike,
  as the GPU figure is, and once the garbage of building the model is handed back (:func:`settle`). Before
  each run what the worker's earlier runs freed is handed back too (:func:`release_free_memory`): glibc keeps
  freed blocks resident, so a batch-1 run that followed a batch-8 one counted the batch-8 activations (a
  merged request measured 1.135× base that way, 1.08× alone). Weights count in full: moe-dense holds three
  FFNs per layer, a merged alignx its experts' factors and the merge's transients, and each run's KV cache.
* Latency: every (method, batch) runs once per round, in a shuffled order, for ``--repeats`` rounds. The
  table shows each one's fastest round (interference on a shared machine only ever adds time); the ratios are
  paired by round, each round's alignx time over its peer's in the same round, and given as the median with
  the lowest and highest round: two methods' minima can come from spells minutes apart, which on these shared
  cores moved one ratio by 30 % from one run to the next, where a paired ratio keeps only what differs
  within seconds.

Last line (the batch-8 figures, where the prompts' weights differ; latency ratios are the paired medians, and the
line above it gives their spread): ``latency_vs_dense=<alignx/moe-dense
decode time> memory_vs_dense=<alignx/moe-dense peak memory> latency_vs_base=<alignx/base decode time>
overhead_vs_dense=<(alignx - base)/(moe-dense - base) decode time> latency_vs_peft=<alignx-top1/peft-top1 decode time> memory_b1_vs_base=<alignx/base peak memory at batch 1,
one merged request>``. JSON and PNG go to ``--out``; every figure names the CPU capability it ran on.

    python benchmarks/efficiency.py --quick                                  # SmolLM2-135M on CPU
    python benchmarks/efficiency.py --shape llama2-7b --random-weights       # LLaMA-2-7B shape, on a GPU
    python benchmarks/efficiency.py --run runs/demo                          # a trained run's experts
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import gc
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from common import (PROMPTS, Rounds, Spread, distinct_weight_rows, generate_exactly, interleaved_rounds, prompt_inputs,
                    random_experts, synthetic_router, timed)

METHODS = ("base", "alignx-soft", "alignx-top1", "merge-linear", "moe-dense", "peft-top1", "peft-arrow")
BATCHES = (1, 8)
HEADLINE_BATCH = 8
WORKERS = {  # worker -> its (method, batch) runs: those that hold the same weights while decoding
    "base": (("base", 1), ("base", 8)),
    "merged": (("alignx-soft", 1), ("alignx-top1", 1), ("merge-linear", 1), ("merge-linear", 8)),
    "per-example": (("alignx-soft", 8), ("alignx-top1", 8)),
    "moe-dense": (("moe-dense", 1), ("moe-dense", 8)),
    "peft": (("peft-top1", 1), ("peft-top1", 8)),
    "peft-arrow": (("peft-arrow", 1), ("peft-arrow", 8)),
}
SHAPES = {  # LlamaConfig fields of the --shape models (built with random weights)
    "llama2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512),
}
MiB = 2**20


# ------------------------------------------------------------------------------------------- the worker


def random_model(shape: str, device: str):
    """A LLaMA of ``shape`` with random bf16 weights, built directly on ``device``, with a word-level tokenizer."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from alignx.models.loading import LoadedModel

    config = LlamaConfig(**SHAPES[shape])
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.eval().requires_grad_(False)
    return LoadedModel(model, word_tokenizer(config.vocab_size), f"random:{shape}", "", config.num_hidden_layers,
                       torch.bfloat16)


def word_tokenizer(vocab_size: int):
    """A word-level tokenizer over this benchmark's own words, for a random model that comes without one: the
    prompts then take the library's usual path (chat formatting, padding, content masks), ~1 token per word."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from alignx.data.formatting import ALPACA_PROMPT

    words = sorted(set(re.findall(r"\w+|[^\w\s]+", ALPACA_PROMPT.format(system="", user=" ".join(PROMPTS)))))
    vocab = {token: i for i, token in enumerate(["<pad>", "<unk>", "</s>", *words])}
    if len(vocab) > vocab_size:
        raise ValueError(f"the word tokenizer needs {len(vocab)} ids, the model has {vocab_size}")
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>", eos_token="</s>")


def build(kind: str, args: argparse.Namespace):
    """This worker's model as ``alignx generate`` holds it (an :class:`AlignX`): the run's trained parts, or the
    random ones of the same shapes that the parent saved in ``--parts`` (see :func:`write_random_parts`)."""
    from peft import PeftModel

    from alignx.axes import AXES
    from alignx.baselines.arrow import load_arrow
    from alignx.baselines.moe_dense import DenseMoE, build_dense_moe, is_trained, load_dense_moe
    from alignx.config import ModelConfig
    from alignx.generate import AlignX
    from alignx.mixing import MixtureOfExperts
    from alignx.models.checkpoint import CheckpointWeights
    from alignx.models.loading import load_base_model
    from alignx.models.precision import autocast_dtype, store_frozen_linears_in
    from alignx.run import RunDir
    from alignx.stage2.mocae import MoCaE
    from alignx.stage2.pipeline import stage2_dir

    run = RunDir(args.run) if args.run else None
    config = run.load_config().model if run else ModelConfig()
    loaded = random_model(args.shape, args.device) if args.shape else load_base_model(config)
    mixture = dense = router = None
    if kind == "moe-dense":  # built before the bf16 storage, as `alignx generate` does
        if run is None:
            dense = DenseMoE.build(loaded.model, {axis: args.parts / "mlp-experts" / axis for axis in AXES})
        else:
            dense = load_dense_moe(run, loaded.model) if is_trained(run) else build_dense_moe(run, loaded.model)
    if kind == "peft-arrow":  # PEFT's Arrow layer fails under bf16 autocast on CPU (see alignx.baselines.arrow)
        config = dataclasses.replace(config, precision="fp32")
    dtype = autocast_dtype(config, args.device)
    if dtype is not None:
        store_frozen_linears_in(loaded.model, dtype, output_projection=True)
    experts = {axis: run.adapter_dir(axis) if run else args.parts / "experts" / axis for axis in AXES}
    if kind in ("merged", "per-example"):
        mixture = MixtureOfExperts.attach(loaded.model, experts, AXES,
                                          originals=None if args.shape else CheckpointWeights.of(config))
    elif kind == "peft":  # one PeftModel holding the three experts as named adapters
        peft_model = PeftModel.from_pretrained(loaded.model, experts[AXES[0]], adapter_name=AXES[0])
        for axis in AXES[1:]:
            peft_model.load_adapter(experts[axis], adapter_name=axis)
        loaded.model = peft_model.eval()
    elif kind == "peft-arrow":
        loaded.model = load_arrow([experts[axis] for axis in AXES], loaded.model)
    loaded.model.to(args.device)
    if kind == "per-example":
        router = MoCaE.load(stage2_dir(run) / "alignx" if run else args.parts / "router")
    return AlignX(run, loaded, mixture, kind, config, router=router, dense=dense)


def write_random_parts(args: argparse.Namespace, directory: Path) -> None:
    """Save the random stand-ins for trained parts (no ``--run``): three LoRA experts on all projections, three
    on the MLP only for moe-dense (which merges the attention deltas into the shared weights, where they cost
    nothing, and would build every expert's full task vector in fp32 at once: 26 GB each for a 7B shape), and
    a MoCaE with random banks. They are made here, in the parent, and the workers load them from files as
    ``alignx generate`` loads trained ones: making them (PEFT wrapping, fitting the banks) leaves tens of MB
    of freed-but-resident heap that would otherwise count against whichever method's worker made them."""
    from alignx.config import ModelConfig
    from alignx.models.layers import target_modules
    from alignx.models.loading import load_base_model

    loaded = random_model(args.shape, args.device) if args.shape else load_base_model(ModelConfig())
    model = loaded.model
    random_experts(model, directory / "experts")
    attention = set(target_modules(model, "attention"))
    mlp = [name for name in target_modules(model, "attention-mlp") if name not in attention]
    random_experts(model, directory / "mlp-experts", targets=",".join(mlp))
    layers = loaded.num_layers
    synthetic_router(model.config.hidden_size, args.bank_size, (layers // 2, 2 * layers // 3),
                     bank_dtype=args.bank_dtype).save(directory / "router")
    del loaded, model
    if torch.device(args.device).type == "cuda":
        torch.cuda.empty_cache()  # the device's memory is the workers' to measure


def settle(model) -> None:
    """Make the CPU's resident set count what the model holds, before any peak is read: copy its tensors out of
    the memory-mapped weights file (whose pages stay resident while any tensor maps it, although the
    projections now live in bf16 copies), then hand the allocator's free memory (the garbage of building:
    fp32 weights, task vectors) back to the system."""
    from alignx.mixing import MixedLoRALinear

    for module in model.modules():
        for param in module._parameters.values():
            if param is not None:
                param.data = param.data.clone()
        for name, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[name] = buffer.clone()
    for module in model.modules():
        if isinstance(module, MixedLoRALinear):
            module.relink()  # the clones split each base weight from the stacked factors it is a view of
    release_free_memory()


def release_free_memory() -> None:
    """Hand what the process has freed back to the system: the garbage collector's, then the C allocator's
    free heap, which glibc otherwise keeps resident (its mmap threshold grows once a large block is freed)."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakMemory:
    """Peak memory of one run in this process: see the module docstring."""

    def __init__(self, device: str):
        self.device = torch.device(device)
        self.baseline = 0 if self.on_gpu else self._status_bytes("VmRSS")

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    def reset(self) -> None:
        if self.on_gpu:
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            release_free_memory()  # the previous run's freed blocks are not this run's
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set

    def peak(self) -> int:
        return torch.cuda.max_memory_allocated(self.device) if self.on_gpu else self._status_bytes("VmHWM") - self.baseline

    @staticmethod
    def _status_bytes(field: str) -> int:
        match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
        return int(match.group(1)) * 1024


def serve(kind: str, args: argparse.Namespace) -> None:
    """Build this worker's model, then answer the parent's requests, one JSON line each, until ``report``."""
    # Every worker imports all that any worker uses before its baseline memory is read, so that the
    # libraries count alike for every method.
    import peft  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401

    import alignx.baselines.moe_dense  # noqa: F401
    import alignx.generate  # noqa: F401
    import alignx.stage1.features  # noqa: F401
    import alignx.stage2.feature_space  # noqa: F401
    import alignx.stage2.fractal  # noqa: F401
    import alignx.stage2.mocae  # noqa: F401
    import alignx.stage2.natural  # noqa: F401
    import alignx.stage2.pipeline  # noqa: F401
    import alignx.stage2.router  # noqa: F401
    from alignx.axes import AXES
    from alignx.mixing import apply_mode
    from alignx.models.precision import autocast, autocast_dtype

    warnings.filterwarnings("ignore", category=FutureWarning)  # the libraries' deprecation notices
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # the libraries' prints go to stderr: stdout carries the replies alone
    memory = PeakMemory(args.device)
    aligner = build(kind, args)
    model, tokenizer = aligner.loaded.model, aligner.loaded.tokenizer
    if memory.on_gpu:
        torch.cuda.empty_cache()  # the building's freed blocks go back to the device, for the other workers
    else:
        settle(model)
    rows = aligner.weights_for(PROMPTS)[0] if args.run and aligner.router is not None else distinct_weight_rows()
    weights = {"base": None, "moe-dense": None, "merge-linear": torch.full((len(PROMPTS), len(AXES)), 1 / len(AXES)),
               "alignx-soft": rows, "alignx-top1": apply_mode(rows, "top1")}
    inputs = {batch: prompt_inputs(tokenizer, aligner.formatter, PROMPTS[:batch], args.device) for batch in BATCHES}
    peaks: dict[str, int] = {}

    def synchronize() -> None:
        if memory.on_gpu:
            torch.cuda.synchronize(memory.device)

    top1 = [AXES[i] for i in weights["alignx-top1"].argmax(dim=1).tolist()]  # PEFT's adapter per prompt

    def experts(method: str, batch: int):
        rows = weights.get(method)
        if method.startswith("peft"):  # PEFT mixes inside the model
            return contextlib.nullcontext()
        return aligner.experts(None if rows is None else rows[:batch])

    def generate(method: str, batch: int, tokens: int) -> float:
        extra = {"adapter_names": top1[:batch]} if method == "peft-top1" else {}
        memory.reset()
        with torch.inference_mode(), autocast(aligner.precision, args.device), experts(method, batch):
            synchronize()
            began = time.perf_counter()
            generate_exactly(model, inputs[batch], tokens, tokenizer.pad_token_id, **extra)
            synchronize()
            elapsed = time.perf_counter() - began
        cell = f"{method}@{batch}"
        peaks[cell] = max(peaks.get(cell, 0), memory.peak())
        return elapsed

    def setting_weights_ms(method: str, batch: int) -> float:
        def cycle() -> None:
            with torch.inference_mode(), experts(method, batch):
                synchronize()

        return timed(cycle, 5) * 1000

    def send(message: dict) -> None:
        replies.write(json.dumps(message) + "\n")

    send({"ready": kind, "model": aligner.loaded.source_id, "device": args.device, "threads": torch.get_num_threads(),
          "dtype": str(autocast_dtype(aligner.precision, args.device) or torch.float32),
          "cpu_capability": torch.backends.cpu.get_cpu_capability(),
          "parameters": sum(p.numel() for p in model.parameters())})
    for line in sys.stdin:
        request = json.loads(line)
        if request["cmd"] == "generate":
            send({"seconds": generate(request["method"], request["batch"], request["tokens"])})
            continue
        one_off = {f"{m}@{b}": {"weights_ms": setting_weights_ms(m, b)} for m, b in WORKERS[kind]}
        if kind == "per-example":  # the router's one-off cost per batch: partial prefill + MoCaE
            for batch in BATCHES:
                router_ms = timed(lambda: aligner.route(PROMPTS[:batch]), 5) * 1000
                for method in ("alignx-soft", "alignx-top1"):
                    one_off.setdefault(f"{method}@{batch}", {})["router_ms"] = router_ms
        send({"peak_bytes": peaks, "one_off": one_off})
        return


# ------------------------------------------------------------------------------------------- the parent


class Worker:
    """A worker process and its request/reply pipe."""

    def __init__(self, kind: str, argv: list[str]):
        self.kind = kind
        self.process = subprocess.Popen([sys.executable, __file__, *argv, "--worker", kind],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def receive(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise SystemExit(f"the {self.kind} worker exited with status {self.process.wait()} (its error is above)")
        return json.loads(line)

    def ask(self, **request) -> dict:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return self.receive()

    def generation(self, method: str, batch: int, tokens: int):
        return lambda: self.ask(cmd="generate", method=method, batch=batch, tokens=tokens)["seconds"]

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


def measure(args: argparse.Namespace, argv: list[str]) -> tuple[dict, list[dict], Rounds]:
    """Start the workers, time every (method, batch) interleaved, then collect their memory and one-off costs."""
    workers = {kind: Worker(kind, argv) for kind in WORKERS if WORKERS[kind][0][0] in args.methods}
    try:
        info = {kind: worker.receive() for kind, worker in workers.items()}
        runs = {f"{m}@{b}": (worker.generation(m, b, args.tokens), worker.generation(m, b, 1))
                for kind, worker in workers.items() for m, b in WORKERS[kind]}
        rounds = interleaved_rounds(runs, args.repeats, args.tokens)
        reports = [worker.ask(cmd="report") for worker in workers.values()]
    finally:
        for worker in workers.values():
            worker.close()
    peaks = {cell: peak for report in reports for cell, peak in report["peak_bytes"].items()}
    one_off: dict[str, dict] = {}
    for report in reports:
        for cell, costs in report["one_off"].items():
            one_off.setdefault(cell, {}).update(costs)
    fastest, rows = rounds.fastest(), []
    for method in args.methods:
        for batch in BATCHES:
            cell = f"{method}@{batch}"
            decode, prefill = fastest[cell]
            rows.append({
                "method": method, "batch": batch, "prefill_ms": prefill * 1000, "decode_ms_per_token": decode * 1000,
                "tokens_per_s": batch / decode, "peak_mib": peaks[cell] / MiB,
                "router_ms": one_off[cell].get("router_ms", 0.0), "weights_ms": one_off[cell]["weights_ms"],
            })
    return info["base"], rows, rounds


def ratios(rows: list[dict], rounds: Rounds, batch: int) -> dict[str, Spread | float]:
    """alignx against its peers at ``batch``: the dense MoE and base (soft weights), PEFT (top-1 routing). Latency
    ratios are paired by round (:meth:`Rounds.paired`): a median with the lowest and highest round; memory is
    each method's peak over all its runs."""
    peak = {(r["method"], r["batch"]): r["peak_mib"] for r in rows}
    alignx, dense, base, top1, peft = (f"{m}@{batch}" for m in ("alignx-soft", "moe-dense", "base", "alignx-top1", "peft-top1"))
    return {
        "latency_vs_dense": rounds.ratio(alignx, dense),
        "memory_vs_dense": peak["alignx-soft", batch] / peak["moe-dense", batch],
        "latency_vs_base": rounds.ratio(alignx, base),
        "top1_vs_base": rounds.ratio(top1, base),
        # the mixing's cost over base as a fraction of the dense MoE's cost over base (issue 40: aim for <= 0.25)
        "overhead_vs_dense": rounds.paired(lambda a, b, d: (a - b) / (d - b), alignx, base, dense),
        "latency_vs_peft": rounds.ratio(top1, peft),
        "memory_vs_base": peak["alignx-soft", batch] / peak["base", batch],
    }


def headline(by_batch: dict[int, dict[str, Spread | float]]) -> dict[str, Spread | float]:
    """The last line: batch 8's ratios (per-example weights) and batch 1's memory against base (one merged request)."""
    wide = by_batch[HEADLINE_BATCH]
    return {**{k: wide[k] for k in ("latency_vs_dense", "memory_vs_dense", "latency_vs_base", "overhead_vs_dense",
                                    "latency_vs_peft")},
            "memory_b1_vs_base": by_batch[1]["memory_vs_base"]}


def median(figure: Spread | float) -> float:
    return figure.median if isinstance(figure, Spread) else figure


def as_json(figures: dict[str, Spread | float]) -> dict:
    return {k: v.as_dict() if isinstance(v, Spread) else v for k, v in figures.items()}


def plot(rows: list[dict], title: str, path: Path) -> None:
    """Bars of decode time per token and peak memory per method, batch 1 beside batch 8."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / len(BATCHES)
    for axis, key, label in ((axes[0], "decode_ms_per_token", "decode time per token (ms)"),
                             (axes[1], "peak_mib", "peak memory (MiB)")):
        for i, batch in enumerate(BATCHES):
            values = [next(r[key] for r in rows if r["method"] == m and r["batch"] == batch) for m in methods]
            positions = [j + (i - (len(BATCHES) - 1) / 2) * width for j in range(len(methods))]
            axis.bar(positions, values, width, label=f"batch {batch}")
        axis.set_xticks(range(len(methods)), methods, rotation=20)
        axis.set_ylabel(label)
        axis.legend()
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer tokens and repeats: under 5 minutes on 2 cores")
    parser.add_argument("--run", help="a run directory: its trained experts, MoCaE routing and dense MoE")
    parser.add_argument("--shape", choices=sorted(SHAPES), help="a LLaMA of this shape instead of the run's or "
                        "the default model (needs --random-weights; tiny: a CPU smoke test of that path)")
    parser.add_argument("--random-weights", action="store_true", help="random weights (--shape): latency and memory "
                        "do not depend on the values")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--tokens", type=int, default=None, help="new tokens per generation (default 64, quick 24)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per method (default 7, quick 5)")
    parser.add_argument("--bank-size", type=int, default=20_000, help="points per axis of the random router's banks")
    parser.add_argument("--bank-dtype", choices=("float32", "float16"), help="storage of the random router's banks "
                        "(default: stage2.bank_dtype's)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/efficiency"), help="where the JSON and "
                        "PNG go")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--parts", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.shape and not args.random_weights:
        parser.error("--shape builds a model with random weights: add --random-weights")
    if args.random_weights and not args.shape:
        parser.error("--random-weights needs --shape (llama2-7b, or tiny for a smoke test)")
    if args.shape and args.run:
        parser.error("--shape and --run exclude each other: a run brings its own model")
    if args.run and args.bank_dtype:
        parser.error("--bank-dtype is for the random router: a run's router keeps the banks it was trained with")
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.tokens = args.tokens or (24 if args.quick else 64)
    args.repeats = args.repeats or (5 if args.quick else 7)
    args.methods = tuple(m for m in METHODS if not (args.quick and m == "peft-arrow"))  # quick: the targets' peers
    if not args.run:
        from alignx.config import Stage2Config

        args.bank_dtype = args.bank_dtype or Stage2Config().bank_dtype
    if args.tokens < 2:
        parser.error("--tokens must be at least 2: decode time is the difference between N tokens and 1")
    return args


def main() -> None:
    argv = sys.argv[1:]
    args = parse_args(argv)
    if args.worker:
        serve(args.worker, args)
        return
    command = "python benchmarks/efficiency.py " + " ".join(argv)
    began, load_before = time.perf_counter(), os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        worker_argv = argv
        if not args.run:
            write_random_parts(args, Path(tmp))
            worker_argv = [*argv, "--parts", tmp]
        info, rows, rounds = measure(args, worker_argv)
    load_after = os.getloadavg()
    memory_measure = "max_memory_allocated" if info["device"].startswith("cuda") else "peak RSS above the libraries"
    print(f"model={info['model']} ({info['parameters'] / 1e6:.1f}M parameters) device={info['device']} "
          f"dtype={info['dtype']} cpu={info['cpu_capability']} threads={info['threads']} tokens={args.tokens} repeats={args.repeats} "
          f"load={load_before[0]:.2f}->{load_after[0]:.2f}"
          + ("" if args.run else f" random banks={args.bank_size}/axis in {args.bank_dtype}"))
    print(f"{'method':<13} {'batch':>5} {'prefill ms':>10} {'decode ms/tok':>13} {'tok/s':>8} {'peak MiB':>9} "
          f"{'router ms':>9} {'weights ms':>10}")
    for r in rows:
        print(f"{r['method']:<13} {r['batch']:>5} {r['prefill_ms']:>10.1f} {r['decode_ms_per_token']:>13.2f} "
              f"{r['tokens_per_s']:>8.1f} {r['peak_mib']:>9.0f} {r['router_ms']:>9.1f} {r['weights_ms']:>10.1f}")
    print(f"peak memory: {memory_measure}; router: partial prefill + MoCaE for the batch; weights: setting the "
          "batch's expert weights (a merge where they are shared); both once per batch")
    by_batch = {batch: ratios(rows, rounds, batch) for batch in BATCHES}
    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "command": command, "model": info["model"], "device": info["device"], "dtype": info["dtype"],
        "threads": info["threads"], "tokens": args.tokens, "repeats": args.repeats, "memory": memory_measure,
        "bank_size": None if args.run else args.bank_size, "bank_dtype": args.bank_dtype,
        "load_average": [load_before[0], load_after[0]], "seconds": time.perf_counter() - began,
        "cpu_capability": info["cpu_capability"], "results": rows, "rounds": rounds.decode,
        "ratios": {batch: as_json(figures) for batch, figures in by_batch.items()}, "headline": as_json(headline(by_batch)),
        "headline_batch": HEADLINE_BATCH,
    }
    (args.out / "efficiency.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(rows, f"{info['model']} on {info['device']} ({info['dtype']}, CPU {info['cpu_capability']})\n{command}", args.out / "efficiency.png")
    print(f"wrote {args.out / 'efficiency.json'} and {args.out / 'efficiency.png'}")
    for batch in BATCHES:
        what = "one merged request" if batch == 1 else "per-example weights"
        print(f"batch {batch} ({what}), latency paired by round, median [lowest, highest] of {args.repeats}: "
              + "; ".join(f"{k}={v}" if isinstance(v, Spread) else f"{k}={v:.3f}" for k, v in by_batch[batch].items()))
    print(f"the last line: batch {HEADLINE_BATCH}'s medians and batch 1's memory")
    print(" ".join(f"{k}={median(v):.3f}" for k, v in headline(by_batch).items()))


if __name__ == "__main__":
    main()
