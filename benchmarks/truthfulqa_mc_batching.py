"""TruthfulQA MC scored one question at a time against several questions per batch, side by side in one run.

`alignx eval` scores ``MC_QUESTIONS_PER_BATCH`` questions together (:func:`alignx.eval.truthfulqa_mc.score_questions`):
one padded pass over their contexts, then their choices' tokens in batches of similar length. This measures
what that buys on the embedded default, for both ways the runner scores:

- ``fixed``: one weight vector for every question (base, an expert, a merge): merged once, the QA primer's
  cache computed once and shared;
- ``routed``: each question its own expert weights on the low-rank path (no primer cache: it depends on them).

Random experts stand in for trained ones (what a rank-16 product costs does not depend on its values). The two
ways run alternately, fastest of ``--repeats``, and their MC1/MC2 must agree:

    python benchmarks/truthfulqa_mc_batching.py                # 48 questions, 3 repeats

Last line: ``fixed_speedup=<one-at-a-time s / batched s> routed_speedup=<x> max_mc2_diff=<x> cpu=<capability>``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from common import distinct_weight_rows, random_experts

from alignx.axes import AXES
from alignx.config import load_config
from alignx.eval.benchmarks import benchmark_items
from alignx.eval.runner import MC_QUESTIONS_PER_BATCH
from alignx.eval.truthfulqa_mc import primer_cache, score_questions
from alignx.mixing import MixtureOfExperts
from alignx.models.checkpoint import CheckpointWeights
from alignx.models.loading import load_base_model
from alignx.models.precision import autocast


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=48, help="the first N of the quick suite's seeded questions")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default="smollm2-135m", help="model.name (default: the embedded SmolLM2)")
    args = parser.parse_args()

    config = load_config(None, [f"model.name={args.model}", f"eval.quick_items={args.questions}"])
    items = sorted(benchmark_items("truthfulqa_mc", config.data, config.eval), key=lambda item: len(item["prompt"]))
    loaded = load_base_model(config.model)
    model, tokenizer = loaded.model, loaded.tokenizer
    device = next(model.parameters()).device
    with tempfile.TemporaryDirectory() as tmp:
        experts = random_experts(model, Path(tmp))
        mixture = MixtureOfExperts.attach(model, experts, AXES, originals=CheckpointWeights.of(config.model))
    routed_weights = distinct_weight_rows(len(items))
    fixed_weights = torch.tensor([0.6, 0.3, 0.1])

    def fixed(per_batch: int) -> list[dict]:
        with mixture.merged(fixed_weights):
            shared = primer_cache(model, tokenizer)
            return [s for start in range(0, len(items), per_batch)
                    for s in score_questions(model, tokenizer, items[start : start + per_batch], shared)]

    def routed(per_batch: int) -> list[dict]:
        scores = []
        for start in range(0, len(items), per_batch):
            weights = routed_weights[start : start + per_batch]
            scores += score_questions(model, tokenizer, items[start : start + per_batch],
                                      rows=lambda questions: mixture.using(weights[questions]))
        return scores

    runs = {(name, per_batch): fn for name, fn in (("fixed", fixed), ("routed", routed))
            for per_batch in (1, MC_QUESTIONS_PER_BATCH)}
    seconds = {key: [] for key in runs}
    results = {}
    with torch.inference_mode(), autocast(config.model, device):
        for key, fn in runs.items():  # warm-up
            results[key] = fn(key[1])
        for _ in range(args.repeats):
            for key, fn in runs.items():
                began = time.perf_counter()
                fn(key[1])
                seconds[key].append(time.perf_counter() - began)
    cpu = torch.backends.cpu.get_cpu_capability()
    print(f"{len(items)} questions, {args.model}, CPU capability {cpu}, {torch.get_num_threads()} threads; fastest of {args.repeats}")
    for (name, per_batch), times in seconds.items():
        print(f"  {name:6s} {per_batch} per batch: {min(times):7.2f} s  ({min(times) / len(items):.3f} s/question)")
    diff = max(abs(a[key] - b[key]) for name in ("fixed", "routed")
               for a, b in zip(results[(name, 1)], results[(name, MC_QUESTIONS_PER_BATCH)]) for key in ("mc1", "mc2"))
    speedup = {name: min(seconds[(name, 1)]) / min(seconds[(name, MC_QUESTIONS_PER_BATCH)]) for name in ("fixed", "routed")}
    print(f"fixed_speedup={speedup['fixed']:.2f} routed_speedup={speedup['routed']:.2f} max_mc2_diff={diff:.2e} cpu={cpu}")


if __name__ == "__main__":
    main()
