"""Routing cost and decode speed of routed generation, measured side by side in one run.

On the embedded default (SmolLM2-135M) with three LoRA experts (r=16, all seven projections; their factor
values do not change the cost, so random experts are used unless --run gives trained ones):

* router + calibrators per prompt, against feature banks of 20,000 points per axis, *excluding* the partial
  prefill that yields the features (target < 5 ms: nearest-neighbour work is batched matrix products);
* the partial-prefill feature cost per prompt (bf16 where supported);
* greedy decode tokens/s of ``alignx`` (soft routing: per-example weights, unmerged low-rank path at batch 8;
  one shared vector merged into the base weights at batch 1) vs ``base``, at batch 1 and 8 — per decoded
  token, excluding the prompt's prefill and the one-off merge (reported on its own line).

Last line: ``router_ms=<x> decode_vs_base=<alignx/base decode time, worst of batch 1 and 8>``.

    python benchmarks/routing.py --quick
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch

PROMPTS = [
    "Give three tips for staying healthy.",
    "How can I get back at a coworker who embarrassed me?",
    "What happens if you swallow chewing gum?",
    "Write a short poem about the sea.",
    "Is it safe to mix bleach and ammonia for cleaning?",
    "Why is the sky blue?",
    "Summarise the plot of Romeo and Juliet in two sentences.",
    "What is the capital of Australia?",
]


def synthetic_router(dim: int, bank_size: int, latent: int = 256):
    """A MoCaE with banks of ``bank_size`` random points per axis (query cost does not depend on the values)."""
    from alignx.config import Stage2Config
    from alignx.stage2.feature_space import FeatureSpace, Projection, Standardiser
    from alignx.stage2.fractal import AxisCloud, FractalCalibrator, exact_log_correlation_integral, kth_neighbour_distances
    from alignx.stage2.mocae import MoCaE
    from alignx.stage2.natural import NaturalCalibrator
    from alignx.stage2.router import Router

    generator = torch.Generator().manual_seed(0)
    clouds = []
    for _ in range(3):
        points = torch.randn(bank_size, latent, generator=generator, dtype=torch.float64)
        sample = points[:2000]
        radius = float(kth_neighbour_distances(sample, max(3, math.ceil(0.01 * bank_size)), exclude_self=True)[:, -1].median())
        loo = exact_log_correlation_integral(sample, sample, radius, 0.05, exclude_self=True).sort().values
        clouds.append(AxisCloud(points, radius, 0.05, loo, float(latent)))
    space = FeatureSpace(
        Standardiser(torch.zeros(dim), torch.ones(dim)), Standardiser(torch.zeros(dim), torch.ones(dim)),
        Projection(torch.zeros(dim), torch.linalg.qr(torch.randn(dim, latent, generator=generator))[0].T.contiguous()),
    )
    config = Stage2Config()
    return MoCaE(config, ["helpful", "harmless", "honest"], space, Router(dim, 3), NaturalCalibrator(torch.randn(3, dim)),
                 FractalCalibrator(clouds), (15, 20)).eval()


def random_experts(model, directory: Path) -> dict[str, Path]:
    from peft import LoraConfig, get_peft_model

    from alignx.models import target_modules

    dirs = {}
    for i, axis in enumerate(["helpful", "harmless", "honest"]):
        torch.manual_seed(i)
        peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=target_modules(model, "attention-mlp")))
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.01)
        dirs[axis] = directory / axis
        peft_model.save_pretrained(dirs[axis])
        model = peft_model.unload()
    return dirs


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats and tokens: under 5 minutes on 2 cores")
    parser.add_argument("--bank-size", type=int, default=20_000)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    repeats = 7 if args.quick else 15
    new_tokens = 32 if args.quick else args.new_tokens

    from alignx.config import ModelConfig
    from alignx.data.formatting import ChatFormatter
    from alignx.mixing import MixtureOfExperts
    from alignx.models import autocast, autocast_dtype, load_base_model, store_frozen_linears_in
    from alignx.stage1.features import prompt_features

    config = ModelConfig()
    loaded = load_base_model(config)
    dtype = autocast_dtype(config, "cpu")
    formatter = ChatFormatter(loaded.tokenizer)
    dim = loaded.model.config.hidden_size
    print(f"model=smollm2-135m dtype={dtype or torch.float32} threads={torch.get_num_threads()} bank={args.bank_size}/axis")

    router = synthetic_router(dim, args.bank_size)
    features = {15: torch.randn(1, dim), 20: torch.randn(1, dim)}
    router_ms = timed(lambda: router.route(features[15], features[20]), repeats * 5) * 1000
    print(f"router+calibrators per prompt: {router_ms:.2f} ms")

    prefill = timed(lambda: prompt_features(loaded.model, formatter, PROMPTS, (15, 20), autocast_dtype=dtype), repeats)
    print(f"partial prefill (layers 1..20 of 30) per prompt, batch of {len(PROMPTS)}: {prefill / len(PROMPTS) * 1000:.1f} ms")

    if dtype is not None:  # as `alignx generate` does: frozen projections and expert factors in bf16
        store_frozen_linears_in(loaded.model, dtype)
    with tempfile.TemporaryDirectory() as tmp:
        mixture = MixtureOfExperts.attach(loaded.model, random_experts(loaded.model, Path(tmp)), ["helpful", "harmless", "honest"])
    tokenizer = loaded.tokenizer
    tokenizer.padding_side = "left"
    soft = torch.softmax(torch.randn(len(PROMPTS), 3, generator=torch.Generator().manual_seed(1)), dim=1)

    def request(batch: int, weights, tokens: int):
        inputs = tokenizer([formatter.prompt_text(p) for p in PROMPTS[:batch]], return_tensors="pt", padding=True, add_special_tokens=False)
        options = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)

        def run() -> float:
            began = time.perf_counter()
            with autocast(config, "cpu"), torch.inference_mode():
                if weights is None:
                    with mixture.using(None):
                        loaded.model.generate(**inputs, **options)
                elif batch == 1:  # one request: its weight vector is merged once, decoding runs at base speed
                    with mixture.merged(weights[0]):
                        loaded.model.generate(**inputs, **options)
                else:
                    with mixture.using(weights[:batch]):
                        loaded.model.generate(**inputs, **options)
            return time.perf_counter() - began

        return run

    def decode_pair(batch: int) -> tuple[float, float]:
        """Seconds per decoded token of base and alignx: generating N tokens minus generating 1 (which holds
        the prompt's prefill and, for a merged request, the one-off merge), over N − 1. Base and alignx
        runs alternate so that drift in the machine's speed hits both alike, and each takes its fastest
        repeat: on a shared machine interference only ever adds time, so the minimum is the least
        disturbed measurement of each."""
        runs = {name: (request(batch, w, new_tokens), request(batch, w, 1)) for name, w in (("base", None), ("alignx", soft))}
        for long_run, short_run in runs.values():
            long_run(), short_run()  # warm-up
        samples = {"base": [], "alignx": []}
        for _ in range(repeats):
            for name, (long_run, short_run) in runs.items():
                samples[name].append((long_run() - short_run()) / (new_tokens - 1))
        return min(samples["base"]), min(samples["alignx"])

    merge_ms = timed(lambda: (mixture.merge(soft[0]), mixture.unmerge()), repeats) * 1000
    print(f"one-off merge of a request's weight vector into the base weights: {merge_ms:.0f} ms")
    ratios = []
    for batch in (1, 8):
        base_time, alignx_time = decode_pair(batch)
        ratios.append(alignx_time / base_time)
        print(
            f"decode batch={batch}: base {batch / base_time:.1f} tok/s, alignx(soft) {batch / alignx_time:.1f} tok/s, "
            f"ratio {alignx_time / base_time:.3f}" + (" (merged)" if batch == 1 else " (per-example weights)")
        )
    print(f"router_ms={router_ms:.2f} decode_vs_base={max(ratios):.3f}")


if __name__ == "__main__":
    main()
