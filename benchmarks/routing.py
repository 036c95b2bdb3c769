"""Routing cost and decode speed of routed generation, measured side by side in one run.

On the embedded default (SmolLM2-135M) with three LoRA experts (r=16, all seven projections; their factor
values do not change the cost, so random experts are used unless --run gives trained ones):

* router + calibrators per prompt, against feature banks of 20,000 points per axis, *excluding* the partial
  prefill that yields the features (target < 5 ms: nearest-neighbour work is batched matrix products);
* the partial-prefill feature cost per prompt (bf16 where supported);
* greedy decode tokens/s of ``alignx`` (soft routing: per-example weights, unmerged low-rank path at batch 8;
  one shared vector merged into the base weights at batch 1) vs ``base``, at batch 1 and 8 — per decoded
  token, excluding the prompt's prefill and the one-off merge (reported on its own line).

Last line: ``router_ms=<x> decode_vs_base=<alignx/base decode time, paired by round, the worse median of batch 1
and 8> scan_floor_ms=<the bank scan alone: the three query-bank products, the memory-bound floor of router_ms>``.

    python benchmarks/routing.py --quick
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from common import (PROMPTS, Spread, distinct_weight_rows, generate_exactly, interleaved_rounds, prompt_inputs,
                    random_experts, synthetic_router, timed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats and tokens: under 5 minutes on 2 cores")
    parser.add_argument("--bank-size", type=int, default=20_000)
    parser.add_argument("--bank-dtype", choices=("float32", "float16"), help="storage of the banks (default: "
                        "stage2.bank_dtype's)")
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    repeats = 7 if args.quick else 15
    new_tokens = 32 if args.quick else args.new_tokens

    from alignx.config import ModelConfig
    from alignx.data.formatting import ChatFormatter
    from alignx.mixing import MixtureOfExperts
    from alignx.models.checkpoint import CheckpointWeights
    from alignx.models.loading import load_base_model
    from alignx.models.precision import autocast, autocast_dtype, store_frozen_linears_in
    from alignx.stage1.features import prompt_features

    config = ModelConfig()
    loaded = load_base_model(config)
    dtype = autocast_dtype(config, "cpu")
    formatter = ChatFormatter(loaded.tokenizer)
    dim = loaded.model.config.hidden_size
    print(f"model=smollm2-135m dtype={dtype or torch.float32} cpu={torch.backends.cpu.get_cpu_capability()} "
          f"threads={torch.get_num_threads()} bank={args.bank_size}/axis")

    router = synthetic_router(dim, args.bank_size, bank_dtype=args.bank_dtype)
    features = {15: torch.randn(1, dim), 20: torch.randn(1, dim)}
    router_ms = timed(lambda: router.route(features[15], features[20]), repeats * 5) * 1000
    print(f"router+calibrators per prompt: {router_ms:.2f} ms")
    clouds = router.fractal.clouds
    query = torch.randn(1, clouds[0].centred.shape[1])
    scan_ms = timed(lambda: [query @ cloud.centred.float().T for cloud in clouds], repeats * 5) * 1000
    print(f"the bank scan alone, the floor of routing one prompt (the {len(clouds)} products [1, {query.shape[1]}] x "
          f"[{query.shape[1]}, {args.bank_size}], memory-bound): {scan_ms:.2f} ms")
    plain = synthetic_router(dim, args.bank_size, bank_dtype=args.bank_dtype, dimension_weight=0.0)
    plain_ms = timed(lambda: plain.route(features[15], features[20]), repeats * 5) * 1000
    print(f"the same without the local-dimension term: {plain_ms:.2f} ms")
    batch = {layer: torch.randn(len(PROMPTS), dim) for layer in (15, 20)}
    batch_ms = timed(lambda: router.route(batch[15], batch[20]), repeats * 5) * 1000 / len(PROMPTS)
    print(f"router+calibrators per prompt in a batch of {len(PROMPTS)}: {batch_ms:.2f} ms")

    prefill = timed(lambda: prompt_features(loaded.model, formatter, PROMPTS, router.layers, max_length=router.max_length,
                                                     autocast_dtype=dtype), repeats)
    print(f"partial prefill (layers 1..20 of 30) per prompt, batch of {len(PROMPTS)}: {prefill / len(PROMPTS) * 1000:.1f} ms")

    if dtype is not None:  # as `alignx generate` does: frozen projections and the LM head in bf16
        store_frozen_linears_in(loaded.model, dtype, output_projection=True)
    with tempfile.TemporaryDirectory() as tmp:
        mixture = MixtureOfExperts.attach(loaded.model, random_experts(loaded.model, Path(tmp)), ["helpful", "harmless", "honest"],
                                          originals=CheckpointWeights.of(config))  # a request merges in place
    soft = distinct_weight_rows()

    def request(batch: int, weights, tokens: int):
        inputs = prompt_inputs(loaded.tokenizer, formatter, PROMPTS[:batch])

        def experts():
            if weights is None:
                return mixture.using(None)
            if batch == 1:  # one request: its weight vector is merged once, decoding runs at base speed
                return mixture.merged(weights[0])
            return mixture.using(weights[:batch])

        def run() -> float:
            began = time.perf_counter()
            with autocast(config, "cpu"), torch.inference_mode(), experts():
                generate_exactly(loaded.model, inputs, tokens, loaded.tokenizer.pad_token_id)
            return time.perf_counter() - began

        return run

    def decode_pair(batch: int) -> tuple[float, float, Spread]:
        """Fastest seconds per decoded token of base and alignx, and alignx's time over base's paired by round
        (see :func:`interleaved_rounds`); the one-token run also holds a merged request's one-off merge, which is
        reported on its own line."""
        rounds = interleaved_rounds(
            {name: (request(batch, w, new_tokens), request(batch, w, 1)) for name, w in (("base", None), ("alignx", soft))},
            repeats, new_tokens,
        )
        fastest = rounds.fastest()
        return fastest["base"][0], fastest["alignx"][0], rounds.ratio("alignx", "base")

    merge_ms = timed(lambda: (mixture.merge(soft[0]), mixture.unmerge()), repeats) * 1000
    print(f"one-off merge of a request's weight vector into the base weights: {merge_ms:.0f} ms")
    ratios = []
    for batch in (1, 8):
        base_time, alignx_time, ratio = decode_pair(batch)
        ratios.append(ratio.median)
        print(
            f"decode batch={batch}: base {batch / base_time:.1f} tok/s, alignx(soft) {batch / alignx_time:.1f} tok/s "
            f"(fastest of {repeats}), ratio paired by round {ratio} (median [lowest, highest])"
            + (" (merged)" if batch == 1 else " (per-example weights)")
        )
    print(f"router_ms={router_ms:.2f} decode_vs_base={max(ratios):.3f} scan_floor_ms={scan_ms:.2f}")


if __name__ == "__main__":
    main()
