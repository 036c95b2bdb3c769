"""Shift-aware output calibration: T_out from out-of-fold predictions over *source groups*.

A temperature fitted on a random (hash) slice of the training banks learns how right the router is on
prompts like its training prompts — 95 % on SmolLM2 — and so learns to trust it. Real prompts come from
elsewhere (AlpacaEval is not Alpaca; TruthfulQA's test half is mostly Non-Adversarial), where the same
router is right ~80 % of the time. Cross-fitting over source groups imitates that shift without ever
touching an evaluation prompt: each fold leaves out whole sources, the model is refitted on the rest, and
the held-out fold is scored as unseen data. T_out is then fitted on those out-of-fold predictions.
Measured on the full banks: ECE 0.119 → 0.021 and NLL 0.748 → 0.586 on the held-out evaluation prompts.

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

FOLDS = 3


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


def out_of_fold_logits(variant: Stage2Config, rows, layers: tuple[int, int], max_length: int, log=print) -> torch.Tensor | None:
    """log w (at T_out = 1) of every fitting row (``~rows.calibration``), each predicted by a model fitted
    without its fold; None when some fold would leave an axis with too few rows to fit (then the caller
    keeps the hash split).

    A fold model early-stops on the hash calibration rows *outside* its left-out fold: rows of the left-out
    sources would tell it when it does well on them, and weaken the very shift the folds imitate.
    """
    from alignx.stage2.pipeline import build_model
    from alignx.stage2.train import train_mocae

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
