"""The axis-loss matrix: Axis Collapse measured without generation and without a judge.

For every method and axis: the mean per-token negative log-likelihood of held-out *gold* responses
(:func:`alignx.data.splits.gold_responses`), teacher-forced, each prompt formatted as at inference (no
injection, no default system prompt) and run with the method's own weights for that prompt: a routed method
routes the prompt, a fixed-weight method uses its weights, the ``oracle`` its gold axis's expert. Forgetting
shows as a method's loss on an axis above that axis's own expert; misrouting as a router's loss above the
oracle's.

The oracle is not run again: its weights on an axis are that axis's expert's one-hot weights, so its rows
are the expert's rows (the same computation). Per item the file keeps the summed NLL and the token count, so
an axis's value is a token-weighted mean and paired bootstrap intervals resample items.

Layout under ``<run>/axis-loss/``: ``<method>.jsonl`` (one line per item: id, axis, nll, tokens; appended a
batch at a time, so an interrupted run resumes) and ``matrix.json``.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from alignx.axes import AXES
from alignx.config import AlignXConfig
from alignx.data.formatting import IGNORE_INDEX
from alignx.data.splits import Example, gold_responses
from alignx.eval.runner import append_jsonl, read_jsonl
from alignx.eval.statistics import Sample, paired_difference
from alignx.generate import ORACLE, AlignX
from alignx.models.precision import autocast
from alignx.run import RunDir, atomic_write_json
from alignx.stage1.batching import collate


def _token_mean(nll: np.ndarray, tokens: np.ndarray) -> float:
    return float(nll.sum() / max(tokens.sum(), 1))


def gold_items(config: AlignXConfig, items_per_axis: int) -> dict[str, list[Example]]:
    return {axis: gold_responses(axis, config.data, items_per_axis).examples for axis in AXES}


@torch.inference_mode()
def item_losses(aligner: AlignX, examples: list[Example], axis: str, max_length: int) -> list[dict]:
    """Summed NLL and token count of each gold response under ``aligner``'s weights for its prompt."""
    formatter, tokenizer = aligner.formatter, aligner.loaded.tokenizer
    encoded = [formatter.encode_training(None, e.user_text, e.response, max_length) for e in examples]
    keep = [(e, x) for e, x in zip(examples, encoded) if x is not None]  # a prompt longer than max_length: no token left
    if not keep:
        return []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batch = collate([[i] for i in range(len(keep))], [x for _, x in keep], pad)  # as Stage 1 scores its loss
    weights, _ = aligner.weights_for([e.user_text for e, _ in keep], [axis] * len(keep))
    model = aligner.loaded.model
    device = next(model.parameters()).device
    kept = batch["logits_to_keep"]
    with aligner.experts(weights), autocast(aligner.precision, device):
        logits = model(input_ids=batch["input_ids"].to(device), logits_to_keep=kept, use_cache=False).logits
    targets = batch["labels"][:, -kept + 1 :].to(device)  # kept >= 2: every item has a prompt and a label
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, ignore_index=IGNORE_INDEX,
                                            reduction="none")
    counts = (targets != IGNORE_INDEX).sum(dim=1)
    return [{"id": e.id, "axis": axis, "nll": float(n), "tokens": int(c)}
            for (e, _), n, c in zip(keep, nll.sum(dim=1).cpu(), counts.cpu())]


def run_method(run: RunDir, method: str, items: dict[str, list[Example]], batch_size: int, max_length: int) -> list[dict]:
    """Every item's loss under one method (resumed from ``<run>/axis-loss/<method>.jsonl``)."""
    path = run.root / "axis-loss" / f"{method}.jsonl"
    done = {row["id"] for row in read_jsonl(path)}
    todo = {axis: [e for e in examples if e.id not in done] for axis, examples in items.items()}
    if any(todo.values()):
        aligner = AlignX.from_run(run.root, method=method)
        total = sum(len(v) for v in items.values())
        with tqdm(total=total, initial=total - sum(len(v) for v in todo.values()), unit="item",
                  desc=f"[axis-loss] {method}", dynamic_ncols=True) as bar, aligner.held():
            for axis, examples in todo.items():
                examples = sorted(examples, key=lambda e: len(e.user_text) + len(e.response))  # less padding
                for start in range(0, len(examples), batch_size):
                    batch = examples[start : start + batch_size]
                    append_jsonl(path, item_losses(aligner, batch, axis, max_length))
                    bar.update(len(batch))
        del aligner
    wanted = {e.id for examples in items.values() for e in examples}
    return [row for row in read_jsonl(path) if row["id"] in wanted]


def axis_loss_matrix(run: RunDir, config: AlignXConfig, methods: list[str], items_per_axis: int, *,
                     batch_size: int = 8, max_length: int = 256, resamples: int = 1000) -> dict:
    """The matrix (method x axis mean NLL, and the mean over axes), with paired differences to ``alignx``.

    ``methods`` may include ``oracle`` (built from the experts' rows) and ``best-expert``: the single expert
    with the lowest mean over axes, i.e. the best one adapter for every prompt."""
    items = gold_items(config, items_per_axis)
    experts = [f"expert-{axis}" for axis in AXES]
    needed = list(dict.fromkeys(m for m in methods if m not in (ORACLE, "best-expert")))
    if ORACLE in methods or "best-expert" in methods:
        needed += [e for e in experts if e not in needed]
    rows = {method: run_method(run, method, items, batch_size, max_length) for method in needed}
    if ORACLE in methods:
        rows[ORACLE] = [r for axis in AXES for r in rows[f"expert-{axis}"] if r["axis"] == axis]
    by_axis = {m: {axis: sorted((r for r in rs if r["axis"] == axis), key=lambda r: r["id"]) for axis in AXES}
               for m, rs in rows.items()}
    samples = {m: {axis: Sample({"nll": np.array([r["nll"] for r in axis_rows]),
                                 "tokens": np.array([r["tokens"] for r in axis_rows], dtype=float)}, _token_mean)
                   for axis, axis_rows in table.items()} for m, table in by_axis.items()}
    matrix = {m: {**{axis: s.value() for axis, s in table.items()}, "mean": float(np.mean([s.value() for s in table.values()]))}
              for m, table in samples.items()}
    if "best-expert" in methods:
        best = min(experts, key=lambda e: matrix[e]["mean"])
        matrix["best-expert"] = {**matrix[best], "expert": best}
        samples["best-expert"] = samples[best]
    result = {"items": {axis: len(v) for axis, v in items.items()}, "metric": "mean per-token NLL of held-out gold responses",
              "matrix": {m: matrix[m] for m in [*methods, *(e for e in experts if e in matrix and e not in methods)]}}
    if "alignx" in samples:
        result["paired_to_alignx"] = {
            m: {**{axis: paired_difference([samples[m][axis]], [samples["alignx"][axis]], resamples, 0) for axis in AXES},
                "mean": paired_difference([samples[m][a] for a in AXES], [samples["alignx"][a] for a in AXES], resamples, 0)}
            for m in result["matrix"] if m != "alignx"}
    atomic_write_json(run.root / "axis-loss" / "matrix.json", result)
    return result
