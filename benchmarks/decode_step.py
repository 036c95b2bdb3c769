"""Where per-example mixing's decode cost goes, and its floor: one batch-8 decode step, measured side by side.

On the embedded default (SmolLM2-135M, three random r=16 LoRA experts on all seven projections: their values
do not change the cost), stored as generation stores it (frozen projections in bf16 where bf16 autocast runs
natively), every configuration runs one decode step of the 8 benchmark prompts on the same fixed KV prefix
(the cache is cropped back after each step), so what differs is the 210 mixed projections alone, without
``generate``'s own per-token work, which every method shares:

* ``base``: the experts attached and off (each projection calls its base layer);
* ``alignx-soft`` / ``alignx-top1``: per-example weights (distinct soft rows; their one-hot argmax).

Each round runs every configuration ``--steps`` times in a shuffled order and keeps each one's fastest step;
the ratio to base is paired by round (median, lowest and highest round), as in ``efficiency.py``.

Then the parts alone, each over all 210 projections in the model's order with nothing else in between, fastest
of the rounds: the wider GEMM (``[out + R, in]``: the base output and x·A) against the base layer's, and the
mixing proper (:meth:`MixedLoRALinear.add_low_rank`: the multiply by the column weights and the second product
added into the base output). Alone, the parts cost what their calls cost with nothing else competing for the
caches: with bf16 on AVX-512 less than inside a step, where each small product follows a GEMM that has just
streamed a weight matrix through the caches (docs/performance.md).

Last line: ``step_vs_base=<alignx-soft/base, paired median> alone_vs_base=<1 + (wider GEMMs' extra + mixing
alone) / base step>``.

    python benchmarks/decode_step.py --quick
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from transformers import DynamicCache

from common import PROMPTS, Spread, distinct_weight_rows, prompt_inputs, random_experts, shuffled_rounds, timed

from alignx.axes import AXES
from alignx.config import ModelConfig
from alignx.data.formatting import ChatFormatter
from alignx.mixing import MixtureOfExperts, apply_mode
from alignx.models.checkpoint import CheckpointWeights
from alignx.models.loading import load_base_model
from alignx.models.precision import autocast, autocast_dtype, store_frozen_linears_in


def step_timer(mixture: MixtureOfExperts, inputs: dict, weights: torch.Tensor | None, dtype, steps: int):
    """A callable timing ``steps`` decode steps on the prompts' fixed KV prefix; returns the fastest, in seconds."""
    model = mixture.model
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(inputs["attention_mask"][:, :1])], dim=1)

    def run() -> float:
        with torch.inference_mode(), autocast(dtype, "cpu"), mixture.using(weights):
            cache = DynamicCache()
            logits = model(**inputs, past_key_values=cache, use_cache=True).logits
            token = logits[:, -1:].argmax(-1)
            fastest = float("inf")
            for _ in range(steps):
                began = time.perf_counter()
                model(input_ids=token, attention_mask=mask, past_key_values=cache, use_cache=True)
                fastest = min(fastest, time.perf_counter() - began)
                cache.crop(-1)  # back to the prefix: every step decodes the same position
        return fastest

    return run


def parts_alone(mixture: MixtureOfExperts, inputs: dict, weights: torch.Tensor, dtype, rounds: int) -> dict[str, float]:
    """Seconds per step of the per-example path's parts, each over every projection in order and nothing else:
    the base layers' GEMMs, the wider GEMMs, and the mixing proper; fastest of ``rounds``."""
    layers = list(mixture.layers.values())
    batch = inputs["input_ids"].shape[0]
    inputs_of = [torch.randn(batch, 1, layer.stacked.shape[1], dtype=dtype or torch.float32) for layer in layers]
    wide = [layer.project(x) for layer, x in zip(layers, inputs_of)]

    def base() -> None:
        for layer, x in zip(layers, inputs_of):
            layer.base(x)

    def wider() -> None:
        for layer, x in zip(layers, inputs_of):
            layer.project(x)

    def mixing() -> None:
        for layer, full in zip(layers, wide):
            layer.add_low_rank(full, batch)

    with torch.inference_mode(), autocast(dtype, "cpu"), mixture.using(weights):
        return {name: timed(fn, rounds, min) for name, fn in (("base GEMMs", base), ("wider GEMMs", wider), ("mixing", mixing))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer rounds: about a minute on 2 cores")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 60, quick 25)")
    parser.add_argument("--steps", type=int, default=5, help="decode steps per configuration and round (the fastest counts)")
    args = parser.parse_args()
    rounds = args.rounds or (25 if args.quick else 60)

    config = ModelConfig()
    loaded = load_base_model(config)
    dtype = autocast_dtype(config, "cpu")
    if dtype is not None:  # as `alignx generate` does: frozen projections and the LM head in bf16
        store_frozen_linears_in(loaded.model, dtype, output_projection=True)
    with tempfile.TemporaryDirectory() as tmp:
        mixture = MixtureOfExperts.attach(loaded.model, random_experts(loaded.model, Path(tmp)), AXES,
                                          originals=CheckpointWeights.of(config))
    inputs = prompt_inputs(loaded.tokenizer, ChatFormatter(loaded.tokenizer), PROMPTS)
    soft = distinct_weight_rows()
    print(f"model=smollm2-135m dtype={dtype or torch.float32} cpu={torch.backends.cpu.get_cpu_capability()} "
          f"threads={torch.get_num_threads()} batch={len(PROMPTS)} projections={len(mixture.layers)} "
          f"ranks={mixture.ranks} rounds={rounds} steps={args.steps}")

    configs = {"base": step_timer(mixture, inputs, None, dtype, args.steps),
               "alignx-soft": step_timer(mixture, inputs, soft, dtype, args.steps),
               "alignx-top1": step_timer(mixture, inputs, apply_mode(soft, "top1"), dtype, args.steps)}
    times = shuffled_rounds(configs, rounds)
    base_step = min(times["base"])
    ratios = {name: Spread.ratio(times[name], times["base"]) for name in configs}
    for name, ratio in ratios.items():
        print(f"{name:<12} fastest step {min(times[name]) * 1000:6.2f} ms   vs base, paired by round: {ratio}")

    parts = parts_alone(mixture, inputs, soft, dtype, rounds)
    extra = parts["wider GEMMs"] - parts["base GEMMs"] + parts["mixing"]
    for name, seconds in parts.items():
        print(f"alone, all {len(mixture.layers)} projections: {name:<12} {seconds * 1000:6.2f} ms per step")
    print(f"mixing in its step: {(min(times['alignx-soft']) - base_step) * 1000:.2f} ms over base's "
          f"{base_step * 1000:.2f}; alone (the wider GEMMs' extra + the mixing): {extra * 1000:.2f} ms")
    print(f"step_vs_base={ratios['alignx-soft'].median:.3f} alone_vs_base={1 + extra / base_step:.3f}")


if __name__ == "__main__":
    main()
