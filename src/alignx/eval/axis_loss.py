"""The axis-loss matrix: Axis Collapse measured without generation and without a judge.

For every method and axis: the mean per-token negative log-likelihood of held-out *gold* responses
(:func:`alignx.data.splits.gold_responses`), teacher-forced, each prompt formatted as at inference (no
injection, no default system prompt) and run with the method's own weights for that prompt: a routed method
routes the prompt, a fixed-weight method uses its weights, the ``oracle`` its gold axis's expert. Forgetting
shows as a method's loss on an axis above that axis's own expert; misrouting as a router's loss above the
oracle's.

Only the response's own (content) tokens are scored: the template's end-of-turn (SmolLM2: ``<|im_end|>\n``) is
reported apart. On one-line TruthfulQA answers (11.8 tokens) base SmolLM2 pays ~15 nats for ``<|im_end|>``
against ~2.6 per content token, 39 % of the summed loss, so a loss with it in would read "learned when to stop"
as "learned the answer". The matrix gives the per-token mean (the headline), the per-answer mean (each answer's
summed content NLL, averaged over answers) and the end-of-turn NLL per answer.

The oracle is not run again: its weights on an axis are that axis's expert's one-hot weights, so its rows
are the expert's rows (the same computation). Per item the file keeps the summed NLLs and token counts, so
an axis's value is a token-weighted mean and paired bootstrap intervals resample prompts (TruthfulQA's several
correct answers to one question are one unit, not independent items).

Layout under ``<run>/axis-loss/``: ``<method>.jsonl`` (one line per item: id, axis, nll, tokens, end_nll,
end_tokens and the key of what produced it; appended a batch at a time, so an interrupted run resumes) and
``matrix.json``. A row counts only under its key (:func:`alignx.generate.method_fingerprint` with the batch
size and length limit): a retrained expert or refitted router is scored anew.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from tqdm.auto import tqdm

from alignx.axes import AXES
from alignx.config import AlignXConfig
from alignx.data.formatting import IGNORE_INDEX
from alignx.data.splits import Example, gold_responses
from alignx.eval.runner import append_jsonl, read_jsonl
from alignx.eval.statistics import Sample, paired_difference
from alignx.generate import ORACLE, AlignX, method_fingerprint
from alignx.models.precision import autocast
from alignx.run import RunDir, atomic_write_json
from alignx.stage1.batching import collate


def _token_mean(nll: np.ndarray, tokens: np.ndarray) -> float:
    return float(nll.sum() / max(tokens.sum(), 1))


def gold_items(config: AlignXConfig, items_per_axis: int) -> dict[str, list[Example]]:
    return {axis: gold_responses(axis, config.data, items_per_axis).examples for axis in AXES}


@torch.inference_mode()
def item_losses(aligner: AlignX, examples: list[Example], axis: str, max_length: int) -> list[dict]:
    """Summed NLL and token count of each gold response's content tokens, and of its end-of-turn tokens, under
    ``aligner``'s weights for its prompt."""
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
    labelled = targets != IGNORE_INDEX
    order = labelled.cumsum(dim=1)  # 1 at a row's first label token, 2 at its second, ...
    content = labelled & (order <= torch.tensor([x.response_tokens for _, x in keep], device=device)[:, None])
    end = labelled & ~content
    return [{"id": e.id, "axis": axis, "nll": float(c), "tokens": int(ct), "end_nll": float(t), "end_tokens": int(tt)}
            for (e, _), c, ct, t, tt in zip(keep, (nll * content).sum(dim=1).cpu(), content.sum(dim=1).cpu(),
                                             (nll * end).sum(dim=1).cpu(), end.sum(dim=1).cpu())]


def run_method(run: RunDir, method: str, items: dict[str, list[Example]], batch_size: int, max_length: int) -> list[dict]:
    """Every item's loss under one method (resumed from ``<run>/axis-loss/<method>.jsonl``, rows of another key
    ignored)."""
    path = run.root / "axis-loss" / f"{method}.jsonl"
    key = hashlib.sha256(f"{method_fingerprint(run, method)}/{batch_size}/{max_length}/content".encode()).hexdigest()[:16]
    done = {row["id"] for row in read_jsonl(path) if row.get("key") == key}
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
                    append_jsonl(path, [{**row, "key": key} for row in item_losses(aligner, batch, axis, max_length)])
                    bar.update(len(batch))
        del aligner
    wanted = {e.id for examples in items.values() for e in examples}
    return list({row["id"]: row for row in read_jsonl(path) if row["id"] in wanted and row.get("key") == key}.values())


def axis_loss_matrix(run: RunDir, config: AlignXConfig, methods: list[str], items_per_axis: int, *,
                     batch_size: int = 8, max_length: int = 256, resamples: int = 1000) -> dict:
    """Score every method's items (cached) and write ``matrix.json``: :func:`matrix_from_rows` of them, with the
    per-item rows and each item's prompt beside it, so the matrix can be recomputed from the file alone."""
    items = gold_items(config, items_per_axis)
    experts = [f"expert-{axis}" for axis in AXES]
    needed = list(dict.fromkeys(m for m in methods if m not in (ORACLE, "best-expert")))
    if ORACLE in methods or "best-expert" in methods:
        needed += [e for e in experts if e not in needed]
    rows = {method: [{k: r[k] for k in ROW_FIELDS} for r in run_method(run, method, items, batch_size, max_length)]
            for method in needed}
    questions = {e.id: e.user_text for examples in items.values() for e in examples}
    result = {**matrix_from_rows(rows, questions, methods, resamples), "items": {axis: len(v) for axis, v in items.items()},
              "rows": rows, "questions": questions}
    atomic_write_json(run.root / "axis-loss" / "matrix.json", result)
    return result


ROW_FIELDS = ("id", "axis", "nll", "tokens", "end_nll", "end_tokens")


def matrix_from_rows(rows: dict[str, list[dict]], questions: dict[str, str], methods: list[str], resamples: int = 1000) -> dict:
    """The matrix (method x axis mean NLL over content tokens, and the mean over axes), the same per answer and for
    the end-of-turn, with paired differences to ``alignx``, from each method's per-item rows.

    ``methods`` may include ``oracle`` (built from the experts' rows) and ``best-expert``: the one adapter for every
    prompt, chosen by :func:`cross_fitted_best` so that no item both picks the expert and scores it. Answers that
    share a prompt (``questions``: id -> prompt) are one bootstrap unit."""
    experts = [f"expert-{axis}" for axis in AXES]
    rows = dict(rows)
    if ORACLE in methods:
        rows[ORACLE] = [r for axis in AXES for r in rows[f"expert-{axis}"] if r["axis"] == axis]
    chosen = {}
    if "best-expert" in methods:
        rows["best-expert"], chosen = cross_fitted_best({e: rows[e] for e in experts})
    by_axis = {m: {axis: sorted((r for r in rs if r["axis"] == axis), key=lambda r: r["id"]) for axis in AXES}
               for m, rs in rows.items()}

    def groups(rs: list[dict]) -> np.ndarray:
        return np.array([questions[r["id"]] for r in rs])

    measures = {"per_token": lambda rs: Sample({"nll": _column(rs, "nll"), "tokens": _column(rs, "tokens")}, _token_mean, groups(rs)),
                "per_answer": lambda rs: Sample({"nll": _column(rs, "nll")}, _mean, groups(rs)),
                "end_of_turn": lambda rs: Sample({"nll": _column(rs, "end_nll")}, _mean, groups(rs))}
    samples = {name: {m: {axis: sample(axis_rows) for axis, axis_rows in table.items()} for m, table in by_axis.items()}
               for name, sample in measures.items()}
    order = [*methods, *(e for e in experts if e in rows and e not in methods)]

    def table(name: str) -> dict:
        out = {}
        for m in order:
            values = {axis: samples[name][m][axis].value() for axis in AXES}
            out[m] = {**values, "mean": float(np.mean(list(values.values()))),
                      **({"expert": "/".join(sorted(set(chosen.values())))} if m == "best-expert" else {})}
        return out

    result = {"metric": "mean per-token NLL of the content tokens of held-out gold responses (end-of-turn apart)",
              "matrix": table("per_token"), "per_answer": table("per_answer"), "end_of_turn": table("end_of_turn"),
              **({"best_expert_by_fold": chosen} if chosen else {})}
    if "alignx" in rows:
        result["paired_to_alignx"] = {m: _paired(samples["per_token"], m, resamples) for m in order if m != "alignx"}
        result["paired_to_alignx_per_answer"] = {m: _paired(samples["per_answer"], m, resamples) for m in order if m != "alignx"}
    return result


def cross_fitted_best(expert_rows: dict[str, list[dict]]) -> tuple[list[dict], dict[str, str]]:
    """The best single expert for every prompt without selection bias: items fall in two folds by a hash of their
    id, and each fold takes the expert with the lowest mean over axes (per-token content NLL) on the *other* fold.
    Choosing and scoring on the same items would make "best expert" the minimum of three noisy means, biased low.
    Returns the rows (each fold's from its chosen expert) and ``{fold: expert}``."""
    def fold(row: dict) -> str:
        return str(int(hashlib.sha256(row["id"].encode()).hexdigest()[:8], 16) % 2)

    def score(rows: list[dict]) -> float:
        return float(np.mean([_token_mean(_column(part, "nll"), _column(part, "tokens"))
                              for axis in AXES if (part := [r for r in rows if r["axis"] == axis])]))

    chosen = {k: min(expert_rows, key=lambda e: score([r for r in expert_rows[e] if fold(r) != k])) for k in ("0", "1")}
    return [r for k, e in chosen.items() for r in expert_rows[e] if fold(r) == k], chosen


def _column(rows: list[dict], key: str) -> np.ndarray:
    return np.array([r[key] for r in rows], dtype=float)


def _mean(nll: np.ndarray) -> float:
    return float(nll.mean()) if len(nll) else float("nan")


def _paired(samples: dict[str, dict[str, Sample]], method: str, resamples: int) -> dict:
    ours, theirs = samples["alignx"], samples[method]
    return {**{axis: paired_difference([theirs[axis]], [ours[axis]], resamples, 0) for axis in AXES},
            "mean": paired_difference([theirs[a] for a in AXES], [ours[a] for a in AXES], resamples, 0)}
