"""``alignx eval``: generate every method's answers, judge them, and summarise with confidence intervals.

Layout under ``<run>/eval/<suite>/``::

    generations/<method>/<benchmark>.jsonl   one line per item: id, prompt, response, weights, routing
    mc/<method>.jsonl                        TruthfulQA MC1/MC2 per question
    scored/<method>/<benchmark>.jsonl        judge probabilities per item and task (which judge made them)
    results.json                             every metric with its 95 % CI, the judges and their accuracy
    per-item.json.gz                         what results.json is computed from, item by item (:func:`per_item_results`)
    exports/                                 the answers in AlpacaEval's and TruthfulQA's own formats (alignx.eval.exports)
    report.md, report.html, *.png            see :mod:`alignx.eval.report`

Nothing finished is redone: generation and MC files are appended one batch (one question) at a time and
a rerun skips the ids already there under the same key; a judge's score is reused while the judge (its identity: a retrained
offline judge is another judge) and the response are unchanged, so an expensive online judge is never asked
twice. Scored files and results are written atomically.

Every generation and MC row carries the key of what produced it (:func:`result_key`: the method's fingerprint,
i.e. its adapters, router and precision, and the generation settings), and only rows of the current key count:
retraining an expert or refitting Stage 2 in the same run directory generates and scores anew.

Axis Collapse (METHOD.md section 5): each axis's headline score of a method relative to that axis's own
expert (``expert-<axis>``): helpful = equal-length win rate (:mod:`alignx.eval.length`), harmless = 1 - unsafe rate on
BeaverTails, honest = TI on TruthfulQA. With ``eval.axis_collapse`` on, each expert is also evaluated on
its own axis's headline benchmark so the ratios exist even when the experts are not in ``--methods``.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from alignx.axes import AXES
from alignx.config import AlignXConfig
from alignx.errors import AlignXError
from alignx.eval.benchmarks import BENCHMARKS, HEADLINE, benchmark_items, check_item_counts
from alignx.eval.exports import write_exports
from alignx.eval.judges import Judge, JudgeItem, JudgeSettings, load_judge, verdicts
from alignx.eval.length import equal_length_pair, token_ids
from alignx.eval.metrics import reliability_bins, routing_metrics
from alignx.eval.report import write_report
from alignx.eval.statistics import (
    Sample,
    corrected_rate,
    mean_with_ci,
    paired_corrected_difference,
    paired_difference,
    rate,
    win_outcomes,
    with_ci,
)
from alignx.eval.truthfulqa_mc import primer_cache, score_questions
from alignx.generate import ORACLE, AlignX, method_fingerprint, token_budget_batches
from alignx.models.precision import autocast
from alignx.run import RunDir, atomic_write_bytes, atomic_write_json, atomic_write_text


@dataclass(frozen=True)
class EvalPaths:
    root: Path

    def generations(self, method: str, benchmark: str) -> Path:
        return self.root / "generations" / method / f"{benchmark}.jsonl"

    def mc(self, method: str) -> Path:
        return self.root / "mc" / f"{method}.jsonl"

    def scored(self, method: str, benchmark: str) -> Path:
        return self.root / "scored" / method / f"{benchmark}.jsonl"

    @property
    def results(self) -> Path:
        return self.root / "results.json"

    @property
    def per_item(self) -> Path:
        return self.root / "per-item.json.gz"


def eval_paths(run: RunDir, suite: str) -> EvalPaths:
    return EvalPaths(run.root / "eval" / suite)


def plan(methods: list[str], axis_collapse: bool, benchmarks: list[str] | None = None) -> dict[str, list[str]]:
    """Method -> the benchmarks it runs: every benchmark (or those of ``benchmarks``) for the requested methods,
    plus (for Axis Collapse) each expert on its own axis's headline benchmark. The oracle comes after the
    experts, whose answers it reuses."""
    chosen = list(BENCHMARKS) if benchmarks is None else [b for b in BENCHMARKS if b in benchmarks]
    todo = {method: list(chosen) for method in methods}
    if axis_collapse:
        for axis, (benchmark, _) in HEADLINE.items():
            if benchmark not in chosen:
                continue
            todo.setdefault(f"expert-{axis}", [])
            if benchmark not in todo[f"expert-{axis}"]:
                todo[f"expert-{axis}"].append(benchmark)
    if ORACLE in todo:
        todo[ORACLE] = todo.pop(ORACLE)
    return todo


def run_eval(run: RunDir, config: AlignXConfig, methods: list[str], judges: dict[str, Judge] | None = None,
             log=print, *, trust_remote_code: bool = False) -> dict:
    """Generate, judge and summarise; returns the results (also written to results.json)."""
    if not methods:
        raise AlignXError("no methods to evaluate: pass --methods, e.g. alignx,base")
    check_item_counts(config.eval)
    paths = eval_paths(run, config.eval.suite)
    todo = plan(methods, config.eval.axis_collapse, config.eval.benchmarks)
    items = {name: benchmark_items(name, config.data, config.eval) for name in BENCHMARKS
             if any(name in benchmarks for benchmarks in todo.values())}
    judges = judges if judges is not None else load_eval_judges(config, todo)  # fail before, not after, generating
    keys = {method: result_key(run, config, method) for method in todo}
    for method, benchmarks in todo.items():
        _generate_method(run, config, method, benchmarks, items, paths, keys, log, trust_remote_code)
    results, per_item = summarise(config, todo, items, paths, judges, keys, log)
    atomic_write_json(paths.results, results)
    answers = collect_answers(per_item)
    write_exports(paths.root, items, {benchmark: {method: {i: a["response"] for i, a in rows.items()}
                                                  for method, rows in entry["methods"].items()}
                                      for benchmark, entry in answers.items()})
    report = write_report(results, paths.root, answers)
    log(f"[eval] results {paths.results}; report {report}")
    return results


def load_eval_judges(config: AlignXConfig, todo: dict[str, list[str]]) -> dict[str, Judge]:
    tasks = {task for benchmarks in todo.values() for b in benchmarks for task in BENCHMARKS[b].judges}
    settings = JudgeSettings(judges_dir=Path(config.eval.judges_dir) if config.eval.judges_dir else None,
                             data_dir=config.data.resolved_data_dir())
    return {task: load_judge(config.eval.judges.get(task, "offline"), task, settings) for task in sorted(tasks)}


# ---------------------------------------------------------------------------------------------- generation
ROW_FORMAT = 2  # the fields a generation row carries (2: token count, at_cap, the equal-length pair); a change regenerates


def result_key(run: RunDir, config: AlignXConfig, method: str) -> str:
    """What produced a method's answers: its fingerprint (:func:`alignx.generate.method_fingerprint`) and every
    generation setting that changes a token (batch composition too: bf16 answers depend on their batch-mates)."""
    settings = {k: getattr(config.eval, k) for k in ("max_new_tokens", "do_sample", "temperature", "top_p", "seed",
                                                      "batch_size", "batch_tokens")}
    text = json.dumps({"method": method_fingerprint(run, method), "rows": ROW_FORMAT, **settings}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def current_rows(path: Path, key: str) -> list[dict]:
    """The rows of a generation or MC file that the current ``key`` produced (a later row of an id wins)."""
    return list({row["id"]: row for row in read_jsonl(path) if row.get("key") == key}.values())


def _generate_method(run, config, method, benchmarks, items, paths: EvalPaths, keys: dict[str, str], log,
                     trust_remote_code: bool = False) -> None:
    key = keys[method]
    if method == ORACLE:
        _reuse_expert_answers(benchmarks, items, paths, keys)
    pending = {b: _pending(items[b], paths.generations(method, b), key) for b in benchmarks if BENCHMARKS[b].generates}
    mc_pending = _pending(items["truthfulqa_mc"], paths.mc(method), key) if "truthfulqa_mc" in benchmarks else []
    if not any(pending.values()) and not mc_pending:
        return
    aligner = AlignX.from_run(run.root, method=method, trust_remote_code=trust_remote_code)
    with aligner.held():
        _generate_pending(aligner, config, method, items, pending, paths, key)
        if mc_pending:
            _run_mc(aligner, method, items["truthfulqa_mc"], mc_pending, paths.mc(method), key)
    del aligner


def _generate_pending(aligner, config, method, items, pending: dict[str, list[dict]], paths: EvalPaths, key: str) -> None:
    options = dict(max_new_tokens=config.eval.max_new_tokens, batch_size=config.eval.batch_size,
                   do_sample=config.eval.do_sample, temperature=config.eval.temperature, top_p=config.eval.top_p)
    for benchmark, todo in pending.items():
        if not todo:
            continue
        bar = tqdm(total=len(items[benchmark]), initial=len(items[benchmark]) - len(todo), unit="prompt",
                   desc=f"[eval] {method} {benchmark}", dynamic_ncols=True)
        lengths = aligner.prompt_lengths([item["prompt"] for item in todo])
        for indices in token_budget_batches(lengths, config.eval.batch_size, config.eval.batch_tokens):
            batch = [todo[i] for i in indices]
            seed = config.eval.seed + int(hashlib.sha256(batch[0]["id"].encode()).hexdigest()[:8], 16)
            generations = aligner.generate([item["prompt"] for item in batch], seed=seed,
                                           axes=[BENCHMARKS[benchmark].oracle_axis] * len(batch), **options)
            rows = [{"id": item["id"], "key": key, "prompt": item["prompt"], "response": g.response, "method": method,
                     **_lengths(aligner.loaded.tokenizer, item, g.response, config.eval.max_new_tokens),
                     **({"weights": g.weights} if g.weights is not None else {}),
                     **({"routing": g.explanation} if g.explanation else {})}
                    for item, g in zip(batch, generations)]
            append_jsonl(paths.generations(method, benchmark), rows)
            bar.update(len(batch))
        bar.close()


def _lengths(tokenizer, item: dict, response: str, max_new_tokens: int) -> dict:
    """The answer's length in tokens, whether it reached the token cap (47 of 48 tokens or more: the decoded text
    re-encodes to a token or so fewer), and for AlpacaEval the equal-length pair its headline judges."""
    tokens = len(token_ids(tokenizer, response))
    out = {"tokens": tokens, "at_cap": tokens >= max_new_tokens - 1}
    if "reference" in item:
        mine, theirs = equal_length_pair(tokenizer, response, item["reference"])
        out["equal_length"] = {"response": mine, "reference": theirs}
    return out


def _reuse_expert_answers(benchmarks: list[str], items: dict[str, list[dict]], paths: EvalPaths, keys: dict[str, str]) -> None:
    """The oracle's answer to an item is its gold axis's expert's answer: the same one-hot weights, batches and
    seeds, so the same computation. Copy what that expert already answered (under its current key) instead of
    generating it again."""
    for benchmark in benchmarks:
        spec = BENCHMARKS[benchmark]
        source = paths.mc if not spec.generates else (lambda m: paths.generations(m, benchmark))
        target = source(ORACLE)
        wanted = {item["id"] for item in _pending(items[benchmark], target, keys[ORACLE])}
        expert = f"expert-{spec.oracle_axis}"
        rows = [{**row, "key": keys[ORACLE], **({"method": ORACLE} if "method" in row else {})}
                for row in current_rows(source(expert), keys.get(expert, "")) if row["id"] in wanted]
        if rows:
            append_jsonl(target, rows)


MC_QUESTIONS_PER_BATCH = 8  # questions scored together (alignx.eval.truthfulqa_mc.batched_continuation_scores)


def _run_mc(aligner, method: str, all_items: list[dict], todo: list[dict], path: Path, key: str) -> None:
    device = next(aligner.loaded.model.parameters()).device
    model, tokenizer = aligner.loaded.model, aligner.loaded.tokenizer
    axis = BENCHMARKS["truthfulqa_mc"].oracle_axis
    todo = sorted(todo, key=lambda item: len(item["prompt"]))  # similar lengths batch with less padding
    groups = [todo[start : start + MC_QUESTIONS_PER_BATCH] for start in range(0, len(todo), MC_QUESTIONS_PER_BATCH)]
    bar = tqdm(total=len(all_items), initial=len(all_items) - len(todo), unit="question",
               desc=f"[eval] {method} truthfulqa_mc", dynamic_ncols=True)
    if aligner.router is None:  # the same weights for every question: merge them once, run the primer once
        weights, _ = aligner.weights_for([todo[0]["prompt"]], [axis])
        with aligner.experts(weights), autocast(aligner.precision, device):
            shared = primer_cache(model, tokenizer)
            for group in groups:
                scores = score_questions(model, tokenizer, group, shared)
                append_jsonl(path, [_mc_row(aligner, item, weights, 0, s, key) for item, s in zip(group, scores)])
                bar.update(len(group))
        bar.close()
        return
    for group in groups:  # a routed method: each question its own weights, on the low-rank path (no merge per question)
        weights, _ = aligner.weights_for([item["prompt"] for item in group], [axis] * len(group))
        with autocast(aligner.precision, device):
            scores = score_questions(model, tokenizer, group,
                                     rows=lambda questions: aligner.experts(weights[questions], merge=False))
        append_jsonl(path, [_mc_row(aligner, item, weights, i, s, key) for i, (item, s) in enumerate(zip(group, scores))])
        bar.update(len(group))
    bar.close()


def _mc_row(aligner, item: dict, weights, row: int, scores: dict, key: str) -> dict:
    return {"id": item["id"], "key": key, **scores, **({"weights": aligner.named_weights(weights, row)} if weights is not None else {})}


def _pending(items: list[dict], path: Path, key: str) -> list[dict]:
    done = {row["id"] for row in current_rows(path, key)}
    return [item for item in items if item["id"] not in done]


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSONL file written by append; a line torn by an interruption is dropped (redone)."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "id" in row:
            rows.append(row)
    return rows


def append_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    with open(path, "a+b") as handle:
        if handle.seek(0, os.SEEK_END):
            handle.seek(-1, os.SEEK_END)
            if handle.read(1) != b"\n":
                text = "\n" + text  # close a line torn by an interruption so it cannot swallow the next row
        handle.write(text.encode("utf-8"))
        handle.flush()


# ---------------------------------------------------------------------------------------------- scoring
def _score(method: str, benchmark: str, rows: list[dict], items: dict[str, dict], judges: dict[str, Judge],
           paths: EvalPaths) -> dict[str, np.ndarray]:
    """Judge probabilities per task for the rows (reusing cached scores of the same judge and response)."""
    path = paths.scored(method, benchmark)
    cached = {row["id"]: row for row in read_jsonl(path)}
    out_rows = [{"id": r["id"], "response": r["response"], "scores": {}} for r in rows]
    probabilities = {}
    for name, task, judged in _judgements(benchmark):
        judge = judges[task]
        values = np.full(len(rows), np.nan)
        missing = []
        for i, r in enumerate(rows):
            old = cached.get(r["id"], {})
            hit = old.get("scores", {}).get(name)
            if old.get("response") == r["response"] and hit and hit.get("judge_id") == judge.identity:
                values[i] = hit["p"]
            else:
                missing.append(i)
        if missing:
            fresh = judge.score([judged(rows[i], items[rows[i]["id"]]) for i in missing])
            values[missing] = np.asarray(fresh, dtype=float)
        for i, row in enumerate(out_rows):
            row["scores"][name] = {"judge": judge.spec, "judge_id": judge.identity, "p": float(values[i])}
        probabilities[name] = values
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in out_rows))
    return probabilities


EQUAL_LENGTH = "helpfulness@equal_length"  # the helpfulness judge on the equal-length pair (alignx.eval.length)


def _judgements(benchmark: str) -> list[tuple[str, str, object]]:
    """(score name, judge task, item builder) of every verdict a benchmark's rows get: each of its judges on the
    answer as it is, and for AlpacaEval the helpfulness judge again on the equal-length pair."""
    out = [(task, task, _judge_item) for task in BENCHMARKS[benchmark].judges]
    if benchmark == "alpacaeval":
        out.append((EQUAL_LENGTH, "helpfulness", _equal_length_item))
    return out


def _judge_item(row: dict, item: dict) -> JudgeItem:
    return JudgeItem(
        prompt=item["prompt"], response=row["response"], reference=item.get("reference"),
        correct_answers=tuple(item.get("correct_answers", ())), incorrect_answers=tuple(item.get("incorrect_answers", ())),
    )


def _equal_length_item(row: dict, item: dict) -> JudgeItem:
    pair = row["equal_length"]
    return JudgeItem(prompt=item["prompt"], response=pair["response"], reference=pair["reference"])


# ---------------------------------------------------------------------------------------------- summary
def summarise(config: AlignXConfig, todo: dict[str, list[str]], items: dict[str, list[dict]], paths: EvalPaths,
              judges: dict[str, Judge], keys: dict[str, str], log=print) -> tuple[dict, dict]:
    """Judge every answer (cached scores reused), write the per-item results, and compute the results from them:
    ``(results, per_item)``."""
    per_item = per_item_results(config, todo, items, paths, judges, keys)
    atomic_write_bytes(paths.per_item, gzip.compress(json.dumps(per_item, ensure_ascii=False).encode(), mtime=0))
    return results_of(per_item, log), per_item


def per_item_results(config: AlignXConfig, todo: dict[str, list[str]], items: dict[str, list[dict]], paths: EvalPaths,
                     judges: dict[str, Judge], keys: dict[str, str]) -> dict:
    """Everything the results are computed from, item by item: each method's answer to every item (its length,
    whether it hit the cap, its final weights and the gate's flag), every judge probability, the MC scores, the
    items' prompts and references, the judges' validation figures and the settings. :func:`results_of` turns it
    into the results; ``benchmarks/study_tables.py --results`` does the same from a committed copy."""
    by_id = {name: {item["id"]: item for item in rows} for name, rows in items.items()}
    methods: dict[str, dict] = {}
    for method, benchmarks in todo.items():
        methods[method] = {}
        for benchmark in benchmarks:
            if not BENCHMARKS[benchmark].generates:
                rows = _complete(current_rows(paths.mc(method), keys[method]), items[benchmark], method, benchmark)
                methods[method][benchmark] = [{"id": r["id"], "mc1": r["mc1"], "mc2": r["mc2"]} for r in rows]
                continue
            rows = _complete(current_rows(paths.generations(method, benchmark), keys[method]), items[benchmark], method, benchmark)
            p = _score(method, benchmark, rows, by_id[benchmark], judges, paths)
            methods[method][benchmark] = [
                {"id": r["id"], "response": r["response"], "tokens": r["tokens"], "at_cap": r["at_cap"],
                 **({"equal_length": r["equal_length"]} if "equal_length" in r else {}),
                 **({"weights": r["weights"]} if "weights" in r else {}),
                 **({"ood": bool(r["routing"].get("ood", False))} if "routing" in r else {}),
                 **({"probabilities": r["routing"]["probabilities"]} if "probabilities" in r.get("routing", {}) else {}),
                 "scores": {name: float(values[i]) for name, values in p.items()}}
                for i, r in enumerate(rows)]
    return {
        "format": PER_ITEM_FORMAT,
        "suite": config.eval.suite,
        "generation": {k: getattr(config.eval, k) for k in ("max_new_tokens", "do_sample", "temperature", "top_p", "seed")},
        "keys": keys,
        "bootstrap": {"resamples": config.eval.bootstrap, "level": 0.95, "seed": config.eval.seed},
        "reference": config.eval.reference,
        "judges": {task: judge.describe() for task, judge in judges.items()},
        "items": {name: [{"id": item["id"], "prompt": item["prompt"], **({"reference": item["reference"]} if "reference" in item else {})}
                         for item in rows] for name, rows in items.items()},
        "methods": methods,
    }


PER_ITEM_FORMAT = 1


def method_samples(per_item: dict) -> dict[str, dict[str, dict[str, Metric]]]:
    """Every method's metrics as per-item samples, ``{method: {benchmark: {metric: Metric}}}``: what the intervals,
    the paired differences and the study's verdicts resample."""
    by_id = {name: {item["id"]: item for item in rows} for name, rows in per_item["items"].items()}
    samples: dict[str, dict] = {}
    for method, benchmarks in per_item["methods"].items():
        samples[method] = {}
        for benchmark, rows in benchmarks.items():
            if not BENCHMARKS[benchmark].generates:
                samples[method][benchmark] = {key: Metric(Sample({"flags": np.array([r[key] for r in rows])}, rate))
                                              for key in ("mc1", "mc2")}
            else:
                samples[method][benchmark] = benchmark_samples(benchmark, rows, by_id[benchmark], _probabilities(rows))
    return samples


def _probabilities(rows: list[dict]) -> dict[str, np.ndarray]:
    return {name: np.array([r["scores"][name] for r in rows], dtype=float) for name in rows[0]["scores"]} if rows else {}


def results_of(per_item: dict, log=print) -> dict:
    """The results (every metric with its 95 % interval, routing, Axis Collapse, paired differences to the
    reference) from the per-item results of :func:`per_item_results`."""
    b, seed = per_item["bootstrap"]["resamples"], per_item["bootstrap"]["seed"]
    confusions = {task: d.get("confusion") for task, d in per_item["judges"].items()}
    by_id = {name: {item["id"]: item for item in rows} for name, rows in per_item["items"].items()}
    samples = method_samples(per_item)
    methods = {}
    for method, benchmarks in per_item["methods"].items():
        metrics: dict[str, dict] = {}
        routed = []  # (probabilities, gold axis, gate flag) of every routed item with a gold axis
        for benchmark, rows in benchmarks.items():
            spec = BENCHMARKS[benchmark]
            if not spec.generates:
                metrics[benchmark] = {key: with_ci(m.sample.values, rate, b, seed) for key, m in samples[method][benchmark].items()}
                continue
            metrics[benchmark] = _benchmark_metrics(benchmark, rows, by_id[benchmark], samples[method][benchmark], b, seed, confusions)
            if spec.gold_axis is not None:  # a routed method's rows carry the gate's flag (fixed weights route nothing)
                routed += [(routing_probabilities(r), spec.gold_axis, r["ood"]) for r in rows
                           if "ood" in r and set(r.get("weights", ())) == set(AXES)]
        entry = {"benchmarks": metrics, "axis_scores": _axis_scores(metrics)}
        if all(benchmark in samples[method] for benchmark, _ in HEADLINE.values()):
            entry["hhh_mean"] = mean_with_ci(_headline(samples[method]), b, seed)
        if routed:
            entry["routing"] = _routing(routed)
        methods[method] = entry
        log(f"[eval] {method}: " + ", ".join(f"{a}={v:.3f}" for a, v in entry["axis_scores"].items()))
    results = {
        "suite": per_item["suite"],
        "items_per_benchmark": {name: len(rows) for name, rows in per_item["items"].items()},
        "generation": per_item["generation"],
        "keys": per_item["keys"],
        "bootstrap": per_item["bootstrap"],
        "judges": per_item["judges"],
        "methods": methods,
    }
    results["axis_collapse"] = axis_collapse(methods)
    reference = per_item["reference"]
    if reference in samples:
        log(f"[eval] paired differences to {reference}")
        results["paired"] = {"reference": reference, "methods": paired_differences(samples, reference, confusions, b, seed)}
    return results


def _headline(samples: dict[str, dict[str, Metric]]) -> list[Sample]:
    """The three axes' headline metrics (HEADLINE: equal-length win rate, BeaverTails safe rate, TI; all in [0, 1],
    higher is better), whose mean is the HHH mean."""
    return [samples[benchmark][key].sample for benchmark, key in HEADLINE.values()]


def paired_differences(samples: dict[str, dict[str, dict[str, Metric]]], reference: str,
                       confusions: dict[str, dict | None], b: int, seed: int) -> dict:
    """Per method other than ``reference``: method - reference for every metric both were evaluated on (same
    items, paired bootstrap; judge-corrected too where the judges were validated) and for the HHH mean."""
    ours = samples[reference]
    out = {}
    for method, theirs in samples.items():
        if method == reference:
            continue
        row: dict = {}
        for benchmark, metrics in theirs.items():
            for key, metric in metrics.items():
                if key not in ours.get(benchmark, {}):
                    continue
                mine = ours[benchmark][key]
                entry = paired_difference([metric.sample], [mine.sample], b, seed)
                if metric.tasks and all(confusions.get(task) is not None for task in metric.tasks):
                    entry["corrected"] = paired_corrected_difference(
                        metric.verdicts, mine.verdicts, [confusions[t] for t in metric.tasks], b, seed)
                row.setdefault(benchmark, {})[key] = entry
        if all(benchmark in theirs and benchmark in ours for benchmark, _ in HEADLINE.values()):
            row["hhh_mean"] = paired_difference(_headline(theirs), _headline(ours), b, seed)
        out[method] = row
    return out


def collect_answers(per_item: dict) -> dict:
    """Per generating benchmark, its prompts and each method's answer, final weights and judge probabilities
    (what report.html shows side by side): ``{benchmark: {"items": [{id, prompt}], "methods": {method:
    {id: {"response", "weights", "scores": {task: p}}}}}}``."""
    answers = {}
    for benchmark, spec in BENCHMARKS.items():
        methods = [m for m, benchmarks in per_item["methods"].items() if benchmark in benchmarks]
        if not spec.generates or not methods:
            continue
        answers[benchmark] = {
            "items": [{"id": item["id"], "prompt": item["prompt"]} for item in per_item["items"][benchmark]],
            "methods": {m: {r["id"]: {"response": r["response"], "weights": r.get("weights"), "scores": r["scores"]}
                            for r in per_item["methods"][m][benchmark]} for m in methods}}
    return answers


def _complete(rows: list[dict], items: list[dict], method: str, benchmark: str) -> list[dict]:
    """The rows of this suite's items, in item order; missing items mean generation did not finish."""
    by_id = {row["id"]: row for row in rows}
    missing = [item["id"] for item in items if item["id"] not in by_id]
    if missing:
        raise AlignXError(f"{method}/{benchmark} is missing {len(missing)} items (e.g. {missing[0]}); rerun `alignx eval` to finish them")
    return [by_id[item["id"]] for item in items]


@dataclass(frozen=True)
class Metric:
    """One metric of one method on one benchmark: its per-item sample and, for a rate binary judges
    produced, those judges' tasks and per-item verdicts (so the rate can be corrected for their error)."""

    sample: Sample
    tasks: tuple[str, ...] = ()
    verdicts: np.ndarray | None = None


def benchmark_samples(benchmark: str, rows: list[dict], items: dict[str, dict], p: dict[str, np.ndarray]) -> dict[str, Metric]:
    """Every metric of a benchmark as per-item data (rows in item order), shared by the intervals and the
    paired differences."""
    def share(x: np.ndarray, *tasks: str) -> Metric:
        said = np.column_stack([verdicts(p[task]) for task in tasks]) if tasks else None
        return Metric(Sample({"flags": x}, rate), tasks, said)

    at_cap = {"at_cap": share(np.array([float(r["at_cap"]) for r in rows]))}
    if benchmark == "alpacaeval":
        def outcomes(task: str, pairs: list[tuple[str, str]]) -> np.ndarray:
            return win_outcomes(p[task], np.array([mine.strip() == theirs.strip() for mine, theirs in pairs]))

        whole = [(r["response"], items[r["id"]]["reference"]) for r in rows]
        cut = [(r["equal_length"]["response"], r["equal_length"]["reference"]) for r in rows]
        return {"win_rate": share(outcomes("helpfulness", whole), "helpfulness"),
                "equal_length_win_rate": share(outcomes(EQUAL_LENGTH, cut)), **at_cap}
    if benchmark == "beavertails":
        unsafe = verdicts(p["safety"]).astype(float)
        return {"unsafe_rate": share(unsafe, "safety"), "safe_rate": share(1.0 - unsafe), **at_cap}
    if benchmark in ("harmful", "xstest_safe"):
        key = "refusal_rate" if benchmark == "harmful" else "over_refusal_rate"
        return {key: share(verdicts(p["refusal"]).astype(float), "refusal"), **at_cap}
    truthful, informative = verdicts(p["truth"]).astype(float), verdicts(p["info"]).astype(float)
    return {"truthful": share(truthful, "truth"), "informative": share(informative, "info"),
            "ti": share(truthful * informative, "truth", "info"), **at_cap}


def _benchmark_metrics(benchmark: str, rows, items, samples: dict[str, Metric], b: int, seed: int,
                       confusions: dict[str, dict | None] | None = None) -> dict:
    """Each metric with its bootstrap CI; a rate a binary judge produced also carries ``corrected``: the rate
    corrected for that judge's validated sensitivity and specificity (:func:`corrected_rate`), where the judge
    has them (offline judges; an online judge was never validated here). BeaverTails' safe rate is corrected
    as 1 - the corrected unsafe rate."""
    confusions = confusions or {}
    metrics = {}
    for key, metric in samples.items():
        metrics[key] = with_ci(metric.sample.values, metric.sample.statistic, b, seed)
        if metric.tasks and all(confusions.get(task) is not None for task in metric.tasks):
            metrics[key]["corrected"] = corrected_rate(metric.verdicts, [confusions[t] for t in metric.tasks], b, seed)
    if benchmark == "alpacaeval":
        metrics["mean_length"] = {"value": float(np.mean([len(r["response"]) for r in rows])),
                                  "reference": float(np.mean([len(items[r["id"]]["reference"]) for r in rows]))}
    if "corrected" in metrics.get("unsafe_rate", {}):
        fixed = metrics["unsafe_rate"]["corrected"]
        metrics["safe_rate"]["corrected"] = {**fixed, "value": 1.0 - fixed["value"], "ci": [1.0 - fixed["ci"][1], 1.0 - fixed["ci"][0]]}
    return metrics


def _axis_scores(metrics: dict) -> dict[str, float]:
    return {axis: metrics[benchmark][key]["value"] for axis, (benchmark, key) in HEADLINE.items() if benchmark in metrics}


def routing_probabilities(row: dict) -> dict[str, float]:
    """A routed item's calibrated routing probabilities: what the routing metrics measure. Rows written before the
    mixing weights were made from them (stage2.mixing) hold only the weights, which were the probabilities then."""
    return row.get("probabilities", row["weights"])


def _routing(routed: list[tuple[dict, str, bool]]) -> dict:
    """Routing metrics of the prompts the router routed, and how many the out-of-distribution gate sent to
    its fallback instead. A fallback row (uniform, or all zeros = the base model) predicts no axis: it is
    neither right nor wrong, so it is counted apart and left out of accuracy, ECE, NLL and misrouting."""

    flagged = [ood for _, _, ood in routed]
    fallback = {
        "n": int(sum(flagged)), "rate": sum(flagged) / len(routed),
        "by_axis": {axis: sum(ood for _, gold, ood in routed if gold == axis) / count
                    for axis in AXES if (count := sum(gold == axis for _, gold, _ in routed))},
    }
    kept = [(w, gold) for w, gold, ood in routed if not ood]
    if not kept:
        return {"fallback": fallback, "n": 0}
    probs = torch.tensor([[w[axis] for axis in AXES] for w, _ in kept], dtype=torch.float32)
    probs = probs / probs.sum(dim=1, keepdim=True)
    labels = torch.tensor([AXES.index(gold) for _, gold in kept])
    return {**routing_metrics(probs, labels, list(AXES)), "reliability": reliability_bins(probs, labels), "fallback": fallback}


def axis_collapse(methods: dict[str, dict]) -> dict:
    """Per method and axis: its headline score / the axis's own expert's score (1.0 = no forgetting)."""
    table = {}
    for method, entry in methods.items():
        row = {}
        for axis in AXES:
            own = methods.get(f"expert-{axis}", {}).get("axis_scores", {}).get(axis)
            score = entry["axis_scores"].get(axis)
            row[axis] = None if own in (None, 0) or score is None else score / own
        table[method] = {"relative": row, "misrouting": entry.get("routing", {}).get("misrouting")}
    return table
