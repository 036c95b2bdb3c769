"""How the evaluation's batch size sets its cost: the same prompts decoded at several batch sizes, one run.

`alignx eval` decodes each benchmark's items in batches of ``eval.batch_size``, sorted by prompt length. On a CPU a
decode step's cost grows more slowly than its batch, so fewer, larger batches finish the same items sooner, up to
the point where the step becomes compute-bound. This decodes ``--items`` training prompts of ``--axis`` (default
helpful: Alpaca; not evaluation prompts: only their cost matters here) with the embedded default (base weights; a
merged fixed-weight method runs at the same speed) at each batch size, the items split into as few batches as that
size allows, of near-equal size, exactly ``--tokens`` new tokens each (no early stop, so every size does the same
work). Then the same prompts in the batches ``alignx eval`` makes with a token budget (``eval.batch_tokens``,
:func:`alignx.generate.token_budget_batches`): at most ``--rows`` prompts and at most that many padded prompt
tokens per batch, which gives the long tail of prompt lengths smaller batches instead of padding 49 short prompts
to the longest one:

    python benchmarks/eval_batch.py                           # 100 items, 48 tokens, sizes 16 32 50 100
    python benchmarks/eval_batch.py --sizes 50 --budgets 2048 4096 8192   # the study's batches of 50, budgeted
    python benchmarks/eval_batch.py --sizes 50 --caches dynamic static     # transformers' KV cache kinds, each size

``--caches``: ``generate``'s ``cache_implementation`` for each schedule (default ``dynamic``, what ``alignx eval`` uses);
a schedule run with another cache is named ``<schedule>/<cache>``. ``--profile``: after the timings, each schedule
once more under ``torch.profiler``, printing where its operators spent their time.

Last line: ``<size>=<seconds per item> ... [tokens<budget>=<seconds per item> ...] [<schedule>/<cache>=<seconds per
item> ...] best=<which> cpu=<capability>``.
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
from alignx.generate import token_budget_batches
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
    parser.add_argument("--budgets", type=int, nargs="*", default=[], help="token budgets to time as well")
    parser.add_argument("--rows", type=int, default=50, help="the most prompts in a budgeted batch")
    parser.add_argument("--profile", action="store_true", help="run each schedule again under torch.profiler: "
                        "its operators' total and the five largest shares")
    parser.add_argument("--caches", nargs="+", default=["dynamic"], help="KV cache kinds to time (dynamic, static)")
    parser.add_argument("--axis", default="helpful", help="whose training prompts (default: helpful, Alpaca)")
    parser.add_argument("--model", default="smollm2-135m", help="model.name (default: the embedded SmolLM2)")
    args = parser.parse_args()

    config = load_config(None, [f"model.name={args.model}", f"data.max_rows_per_axis={args.items}"])
    prompts = sorted((example.user_text for example in training_examples(args.axis, config.data).examples[: args.items]), key=len)
    loaded = load_base_model(config.model)
    model, tokenizer = loaded.model, loaded.tokenizer
    formatter = ChatFormatter(tokenizer)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    lengths = [int(n) for n in prompt_inputs(tokenizer, formatter, prompts)["attention_mask"].sum(dim=1)]
    schedules = {str(size): [list(batch) for batch in balanced_batches(len(prompts), size)] for size in args.sizes}
    schedules |= {f"tokens{budget}": token_budget_batches(lengths, args.rows, budget) for budget in args.budgets}
    runs = [(name if cache == "dynamic" else f"{name}/{cache}", batches, cache)
            for cache in args.caches for name, batches in schedules.items()]
    print(f"prompt tokens: median {sorted(lengths)[len(lengths) // 2]}, longest {max(lengths)}", flush=True)
    seconds = {}

    def decode(batches: list[list[int]], cache: str) -> None:
        for batch in batches:
            generate_exactly(model, prompt_inputs(tokenizer, formatter, [prompts[i] for i in batch], device), args.tokens, pad,
                             cache_implementation=cache)

    with torch.inference_mode(), autocast(config.model, device):
        generate_exactly(model, prompt_inputs(tokenizer, formatter, prompts[:4], device), 4, pad)  # warm-up
        for name, batches, cache in runs:
            began = time.perf_counter()
            decode(batches, cache)
            seconds[name] = time.perf_counter() - began
            padded = sum(len(batch) * max(lengths[i] for i in batch) for batch in batches)
            print(f"  {name:>12} ({len(batches)} batches of {', '.join(str(len(b)) for b in batches)}; {padded} padded "
                  f"prompt tokens for {sum(lengths)}): {seconds[name]:7.1f} s, {seconds[name] / len(prompts):.3f} s/item",
                  flush=True)
        if args.profile:  # each schedule once more, under the profiler (which runs slower than the clock above)
            for name, batches, cache in runs:
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
                    decode(batches, cache)
                events = sorted(profiler.key_averages(), key=lambda event: event.self_cpu_time_total, reverse=True)
                total = sum(event.self_cpu_time_total for event in events)
                print(f"  {name:>12} profiled: {total / 1e6:.1f} s in operators, "
                      + ", ".join(f"{event.key} {event.self_cpu_time_total / total:.0%}" for event in events[:5]), flush=True)
    cpu = torch.backends.cpu.get_cpu_capability()
    print(f"{len(prompts)} {args.axis} training prompts, {args.tokens} new tokens, {args.model}, CPU capability {cpu}, "
          f"{torch.get_num_threads()} threads")
    print(" ".join(f"{name}={seconds[name] / len(prompts):.3f}" for name, _, _ in runs)
          + f" best={min(seconds, key=seconds.get)} cpu={cpu}")


if __name__ == "__main__":
    main()
