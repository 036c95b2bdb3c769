"""How the evaluation's batch size sets its cost: the same prompts decoded at several batch sizes, one run.

`alignx eval` decodes each benchmark's items in batches of ``eval.batch_size``, sorted by prompt length. On a
CPU a decode step's cost grows more slowly than its batch, so fewer, larger batches finish the same items
sooner, up to the point where the step becomes compute-bound. This decodes ``--items`` Alpaca training prompts (not evaluation prompts: only their cost matters here) with the
embedded default (base weights; a merged fixed-weight method runs at the same speed) at each batch size, the
items split into as few batches as that size allows, of near-equal size, exactly ``--tokens`` new tokens each
(no early stop, so every size does the same work):

    python benchmarks/eval_batch.py                           # 100 items, 48 tokens, batch sizes 16 32 50 100

Last line: ``<size>=<seconds per item> ...  best=<size> cpu=<capability>``.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from common import generate_exactly, prompt_inputs

from alignx.config import load_config
from alignx.data.formatting import ChatFormatter
from alignx.data.splits import training_examples
from alignx.models.loading import load_base_model
from alignx.models.precision import autocast


def balanced_batches(count: int, size: int) -> list[range]:
    """``count`` items in as few batches of at most ``size`` as possible, of near-equal size."""
    batches = math.ceil(count / size)
    bounds = [round(i * count / batches) for i in range(batches + 1)]
    return [range(lo, hi) for lo, hi in zip(bounds, bounds[1:])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=100)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 32, 50, 100])
    parser.add_argument("--model", default="smollm2-135m", help="model.name (default: the embedded SmolLM2)")
    args = parser.parse_args()

    config = load_config(None, [f"model.name={args.model}", f"data.max_rows_per_axis={args.items}"])
    prompts = sorted((example.user_text for example in training_examples("helpful", config.data).examples[: args.items]), key=len)
    loaded = load_base_model(config.model)
    model, tokenizer = loaded.model, loaded.tokenizer
    formatter = ChatFormatter(tokenizer)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    seconds = {}
    with torch.inference_mode(), autocast(config.model, device):
        generate_exactly(model, prompt_inputs(tokenizer, formatter, prompts[:4], device), 4, pad)  # warm-up
        for size in args.sizes:
            began = time.perf_counter()
            for batch in balanced_batches(len(prompts), size):
                generate_exactly(model, prompt_inputs(tokenizer, formatter, prompts[batch.start : batch.stop], device),
                                 args.tokens, pad)
            seconds[size] = time.perf_counter() - began
            print(f"  batch size {size:4d} ({len(balanced_batches(len(prompts), size))} batches): {seconds[size]:7.1f} s, "
                  f"{seconds[size] / len(prompts):.3f} s/item", flush=True)
    cpu = torch.backends.cpu.get_cpu_capability()
    print(f"{len(prompts)} Alpaca prompts, {args.tokens} new tokens, {args.model}, CPU capability {cpu}, "
          f"{torch.get_num_threads()} threads")
    print(" ".join(f"{size}={seconds[size] / len(prompts):.3f}" for size in args.sizes)
          + f" best={min(seconds, key=seconds.get)} cpu={cpu}")


if __name__ == "__main__":
    main()
