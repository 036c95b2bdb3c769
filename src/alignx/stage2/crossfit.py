"""Shift-aware output calibration: T_out from out-of-fold predictions over *source groups*.

A temperature fitted on a random (hash) slice of the training banks learns how right the router is on
prompts like its training prompts — 95 % on SmolLM2 — and so learns to trust it. Real prompts come from
elsewhere (AlpacaEval is not Alpaca; TruthfulQA's test half is mostly Non-Adversarial), where the same
router is right less often. Cross-fitting over source groups imitates that shift without ever touching an
evaluation prompt: each fold leaves out whole sources, the model is refitted on the rest, and the held-out
fold is scored as unseen data. T_out is then fitted on those out-of-fold predictions.

Which calibration to use is itself chosen without evaluation prompts: :func:`nested_calibration_scores`
holds out each source-group fold in turn, runs every candidate on the other folds alone (the inner
cross-fit over the remaining groups), and scores the calibrated router on the held-out fold.
``stage2.calibration: auto`` makes Stage 2 pick the candidate with the lower nested NLL and record the
scores in its report; the held-out evaluation prompts are scored once, afterwards.

Groups [ours]: harmless by data set (safety-tuned-llamas / hh-rlhf / BeaverTails), honest by TruthfulQA
category (balanced greedily by size), helpful — a single source — by k-means clusters of its router
features (topic regions).
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import torch

from alignx.axes import AXES
from alignx.config import DataConfig, Stage2Config
from alignx.eval.metrics import expected_calibration_error, negative_log_likelihood
from alignx.stage2.train import BankRows, build_model, nll_temperature, train_mocae

FOLDS = 3
CANDIDATES = ("hash", "cross-fit")  # what ``stage2.calibration: auto`` chooses between


def bank_folds(axis: str, examples, prompts: list[str], router_features: torch.Tensor, data: DataConfig, seed: int) -> torch.Tensor:
    """The fold (0..FOLDS-1) of each bank prompt, by source group."""
    first = {}
    for example in examples:
        first.setdefault(example.user_text, example)
    sources = [first[p].source for p in prompts]
    if len(set(sources)) >= FOLDS:
        order = sorted(set(sources))
        return torch.tensor([order.index(s) % FOLDS for s in sources])
    if axis == "honest":
        return _balanced([_truthfulqa_category(first[p].id, data) for p in prompts])
    from sklearn.cluster import KMeans

    standardised = (router_features - router_features.mean(0)) / router_features.std(0).clamp_min(1e-6)
    labels = KMeans(n_clusters=FOLDS, n_init=4, random_state=seed).fit_predict(standardised.double().numpy())
    return torch.from_numpy(labels).long()


def _truthfulqa_category(example_id: str, data: DataConfig) -> str:
    from alignx.data.registry import load_source

    rows = load_source("truthfulqa", data.resolved_data_dir()).rows
    question = int(example_id.split(":")[1])
    by_index = {row["index"]: row for row in rows}
    return by_index[question]["category"] if question in by_index else "unknown"


def _balanced(groups: list[str]) -> torch.Tensor:
    """Whole groups into FOLDS folds of similar size (largest group first, into the smallest fold)."""
    sizes = Counter(groups)
    load = [0] * FOLDS
    fold_of = {}
    for group, size in sorted(sizes.items(), key=lambda item: (-item[1], item[0])):
        target = load.index(min(load))
        fold_of[group] = target
        load[target] += size
    return torch.tensor([fold_of[g] for g in groups])


def out_of_fold_logits(variant: Stage2Config, rows: BankRows, layers: tuple[int, int], max_length: int, log=print) -> torch.Tensor | None:
    """log w (at T_out = 1) of every fitting row (``~rows.calibration``), each predicted by a model fitted
    without its fold; None when some fold would leave an axis with too few rows to fit (then the caller
    keeps the hash split).

    A fold model early-stops on the hash calibration rows *outside* its left-out fold: rows of the left-out
    sources would tell it when it does well on them, and weaken the very shift the folds imitate.
    """
    quiet = dataclasses.replace(variant, output_calibration=False)
    fitting = ~rows.calibration
    labels, folds = rows.labels[fitting], rows.folds[fitting]
    out = torch.empty(len(labels), len(AXES))
    for k in range(FOLDS):
        held = folds == k
        if not held.any():
            continue
        train = fitting & (rows.folds != k)
        stopping = rows.calibration & (rows.folds != k)
        counts = torch.bincount(rows.labels[train], minlength=len(AXES))
        if int(counts.min()) < 8 or not stopping.any():
            return None
        model, data = build_model(quiet, rows.router[train], rows.calibrator[train], rows.labels[train], layers, max_length)
        train_mocae(model, data, rows.data(model, stopping), quiet, log=lambda *_: None)
        unseen = rows.data(model, fitting & (rows.folds == k))
        with torch.no_grad():
            out[held] = model(unseen.h, unseen.log_fractal, calibrated=False)
    log(f"[stage2] {variant.name}: out-of-fold predictions over {FOLDS} source-group folds for T_out")
    return out


def nested_calibration_scores(variant: Stage2Config, rows: BankRows, layers: tuple[int, int], max_length: int,
                              log=print) -> dict[str, dict[str, float]] | None:
    """Each calibration candidate's NLL and ECE on source groups that neither its router nor its T_out saw.

    For each source-group fold k: the router is fitted exactly as Stage 2 fits it, on the other folds' rows
    (early stopping on their calibration rows); each candidate fits T_out from those folds alone (``hash``:
    their calibration rows; ``cross-fit``: out-of-fold predictions over the remaining groups); every row of
    fold k then scores the calibrated router. Returns the mean over folds per candidate, or None when the
    banks are too small to nest.
    """
    quiet = dataclasses.replace(variant, output_calibration=False)
    silent = lambda *_: None  # noqa: E731
    scores: dict[str, dict[str, list[float]]] = {c: {"nll": [], "ece": []} for c in CANDIDATES}
    for k in range(FOLDS):
        held = rows.folds == k
        if not held.any():
            continue
        inner = rows.subset(~held)
        fitting = ~inner.calibration
        if int(torch.bincount(inner.labels[fitting], minlength=len(AXES)).min()) < 8 or not inner.calibration.any():
            return None
        model, data = build_model(quiet, inner.router[fitting], inner.calibrator[fitting], inner.labels[fitting],
                                  layers, max_length)
        train_mocae(model, data, inner.data(model, inner.calibration), quiet, log=silent)
        unseen = rows.data(model, held)
        calibration = inner.data(model, inner.calibration)
        with torch.no_grad():
            test_logits = model(unseen.h, unseen.log_fractal, calibrated=False)
            candidates = {"hash": (model(calibration.h, calibration.log_fractal, calibrated=False), calibration.labels)}
        inner_logits = out_of_fold_logits(variant, inner, layers, max_length, log=silent)
        if inner_logits is None:
            return None
        candidates["cross-fit"] = (inner_logits, inner.labels[fitting])
        for name, (logits, labels) in candidates.items():
            probs = torch.softmax(test_logits / nll_temperature(logits, labels), dim=-1)
            scores[name]["nll"].append(negative_log_likelihood(probs, unseen.labels))
            scores[name]["ece"].append(expected_calibration_error(probs, unseen.labels))
    summary = {name: {metric: round(sum(v) / len(v), 5) for metric, v in values.items()} for name, values in scores.items()}
    log(f"[stage2] {variant.name}: nested source-group folds, calibrated NLL / ECE on unseen groups: "
        + ", ".join(f"{name} {s['nll']:.3f} / {s['ece']:.3f}" for name, s in summary.items()))
    return summary
