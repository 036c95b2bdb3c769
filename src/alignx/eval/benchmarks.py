"""The evaluation benchmarks (METHOD.md section 5): which prompts, which judges, which gold axis.

Every benchmark is a list of items ``{"id", "prompt", ...}`` drawn from the canonical evaluation splits of
:mod:`alignx.data.splits`, so no item was ever seen in training or by a judge. The ``quick`` suite keeps a
seeded subset of ``eval.quick_items`` items per benchmark (the same subset every time); ``full`` keeps all.

    benchmark      axis       judged by           measures
    alpacaeval     helpful    helpfulness         equal-length win rate (alignx.eval.length) and win rate vs
                                                  text-davinci-003 (the answers of AlpacaEval's alpaca_eval_gpt4
                                                  annotations)
    beavertails    harmless   safety              % unsafe responses (lower is better)
    harmful        harmless   refusal             % refusals of clearly harmful requests (XSTest unsafe +
                                                  the safety-tuned-llamas harmful sets)
    xstest_safe    harmless   refusal             % refusals of XSTest's 250 safe prompts (over-refusal)
    truthfulqa     honest     truth, info         % truthful, % informative, % both (TI)
    truthfulqa_mc  honest     (log-likelihood)    MC1 / MC2 on the same questions, no generation

``gold_axis`` is the axis a router should send the prompt to; XSTest's safe prompts have none (they are
benign questions that merely sound unsafe), so they do not count in routing metrics. ``oracle_axis`` is the
expert the ``oracle`` method uses: the gold axis, and for XSTest's safe prompts the helpful expert (a benign
request deserves a helpful answer).

In the quick suite, ``eval.items`` overrides ``eval.quick_items`` per benchmark (e.g. all 409 MC questions).
"""

from __future__ import annotations

from dataclasses import dataclass

from alignx.config import DataConfig, EvalConfig
from alignx.data.loading import load_source
from alignx.data.splits import (
    evaluation_prompts,
    harmful_eval_prompts,
    normalise_prompt,
    seeded_subset,
    xstest_prompts,
)
from alignx.errors import AlignXError
from alignx.eval.judges.data import alpacaeval_references


@dataclass(frozen=True)
class Benchmark:
    name: str
    axis: str  # the HHH axis whose score it feeds
    judges: tuple[str, ...]  # judge tasks it needs (empty: scored by log-likelihood)
    gold_axis: str | None  # where a router should send its prompts (None: not a routing item)
    generates: bool = True

    @property
    def oracle_axis(self) -> str:
        return self.gold_axis or "helpful"


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark("alpacaeval", "helpful", ("helpfulness",), "helpful"),
        Benchmark("beavertails", "harmless", ("safety",), "harmless"),
        Benchmark("harmful", "harmless", ("refusal",), "harmless"),
        Benchmark("xstest_safe", "harmless", ("refusal",), None),
        Benchmark("truthfulqa", "honest", ("truth", "info"), "honest"),
        Benchmark("truthfulqa_mc", "honest", (), "honest", generates=False),
    )
}

# Each axis's headline metric: what Axis Collapse divides by the axis's own expert (METHOD.md section 5).
HEADLINE = {"helpful": ("alpacaeval", "equal_length_win_rate"), "harmless": ("beavertails", "safe_rate"), "honest": ("truthfulqa", "ti")}


def benchmark_items(name: str, data: DataConfig, evaluation: EvalConfig) -> list[dict]:
    """The items of one benchmark for this suite (see the module docstring)."""
    if name not in BENCHMARKS:
        raise AlignXError(f"unknown benchmark {name!r}; valid: {', '.join(BENCHMARKS)}")
    items = _all_items(name, data)
    count = evaluation.items.get(name, evaluation.quick_items)
    if evaluation.suite == "quick" and count < len(items):
        items = seeded_subset(items, count, evaluation.seed)
    return items


def check_item_counts(evaluation: EvalConfig) -> None:
    """``eval.items`` and ``eval.benchmarks`` may only name benchmarks (a typo in ``eval.items`` would otherwise
    silently keep ``quick_items``)."""
    for setting, names in (("eval.items", evaluation.items), ("eval.benchmarks", evaluation.benchmarks or ())):
        unknown = sorted(set(names) - set(BENCHMARKS))
        if unknown:
            raise AlignXError(f"{setting}: unknown benchmark {unknown[0]!r}; valid: {', '.join(BENCHMARKS)}")


def _all_items(name: str, data: DataConfig) -> list[dict]:
    if name == "alpacaeval":  # the reference GPT-4 judged against, which the helpfulness judge learned from
        references = alpacaeval_references(data.resolved_data_dir())
        datasets = {f"alpaca_eval:{r['index']}": r["dataset"] for r in load_source("alpaca_eval", data.resolved_data_dir()).rows}
        return [{"id": e.id, "prompt": e.instruction, "reference": references[normalise_prompt(e.instruction)],
                 "dataset": datasets.get(e.id, "")} for e in evaluation_prompts("helpful", data).examples]
    if name == "beavertails":
        return [{"id": e.id, "prompt": e.instruction} for e in evaluation_prompts("harmless", data).examples]
    if name == "harmful":
        xstest = [{"id": f"xstest:{r['id']}", "prompt": r["prompt"], "set": "xstest-unsafe"}
                  for r in xstest_prompts(data) if r["label"] == "unsafe"]
        return xstest + [{"id": f"stl:{r['id']}", "prompt": r["prompt"], "set": r["set"]} for r in harmful_eval_prompts(data)]
    if name == "xstest_safe":
        return [{"id": f"xstest:{r['id']}", "prompt": r["prompt"], "type": r["type"]}
                for r in xstest_prompts(data) if r["label"] == "safe"]
    if name == "truthfulqa":
        return _truthfulqa_items(data)
    return _truthfulqa_mc_items(data)


def _truthfulqa_items(data: DataConfig) -> list[dict]:
    rows = {r["question"]: r for r in load_source("truthfulqa", data.resolved_data_dir()).rows}
    items = []
    for e in evaluation_prompts("honest", data).examples:
        row = rows[e.instruction]
        items.append({"id": e.id, "prompt": e.instruction, "best_answer": row["best_answer"],
                      "correct_answers": row["correct_answers"], "incorrect_answers": row["incorrect_answers"],
                      "type": row["type"], "category": row["category"], "source": row["source"]})
    return items


def _truthfulqa_mc_items(data: DataConfig) -> list[dict]:
    """The MC1/MC2 targets of the TruthfulQA evaluation questions (409-817), matched by question text.

    Items keep the generation benchmark's ids, so the quick suite's seeded subset picks the same
    questions for both; a question missing from the MC file is an error (the files disagree).
    """
    targets = {normalise_prompt(r["question"]): r for r in load_source("truthfulqa_mc", data.resolved_data_dir()).rows}
    items = []
    for item in _truthfulqa_items(data):
        row = targets.get(normalise_prompt(item["prompt"]))
        if row is None:
            raise AlignXError(f"TruthfulQA question {item['id']} has no multiple-choice targets in truthfulqa/mc_task.json")
        items.append({"id": item["id"], "prompt": item["prompt"],
                      "mc1_targets": row["mc1_targets"], "mc2_targets": row["mc2_targets"]})
    return items
