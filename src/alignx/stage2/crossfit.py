"""Shift-aware output calibration: T_out from out-of-fold predictions over *source groups*.

A temperature fitted on a random (hash) slice of the training banks learns how right the router is on
prompts like its training prompts — 95 % on SmolLM2 — and so learns to trust it. Real prompts come from
elsewhere (AlpacaEval is not Alpaca; TruthfulQA's test half is mostly Non-Adversarial), where the same
router is right less often. Cross-fitting over source groups imitates that shift without ever touching an
evaluation prompt: each fold leaves out whole sources, the model is refitted on the rest, and the held-out
fold is scored as unseen data. T_out is then fitted on those out-of-fold predictions.

The same folds choose between whole designs (:func:`nested_scores`, used by ``benchmarks/routing_quality.py``)
and between ways of fitting the head. Which calibration to use is itself chosen without evaluation prompts: :func:`nested_calibration_scores`
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
import torch.nn.functional as F
from sklearn.cluster import KMeans

from alignx.axes import AXES
from alignx.config import DataConfig, Stage2Config
from alignx.data.loading import load_source
from alignx.eval.metrics import expected_calibration_error, negative_log_likelihood
from alignx.stage2.heads import Parts
from alignx.stage2.mocae import MoCaE, log_weights
from alignx.stage2.train import BankRows, build_model, fitted_head, train_mocae

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

    standardised = (router_features - router_features.mean(0)) / router_features.std(0).clamp_min(1e-6)
    labels = KMeans(n_clusters=FOLDS, n_init=4, random_state=seed).fit_predict(standardised.double().numpy())
    return torch.from_numpy(labels).long()


def _truthfulqa_category(example_id: str, data: DataConfig) -> str:
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


def trunk_of(variant: Stage2Config) -> Stage2Config:
    """The fit whose router and calibrators ``variant``'s predictions come from (everything but the head).

    Every variant whose router trains on log p alone (``pooled``, or no calibrators at all) shares one trunk:
    the router trained alone, with both calibrators fitted beside it; each variant then reads the parts it
    uses (:func:`~.mocae.parts_for`). Neither calibrator touches the router's training or its random state,
    so this is the same router each of those variants would fit on its own (tested).
    """
    plain = dict(name="trunk", output_calibration=False, output_head="temperature", adaptive_temperature=False,
                 head_class_balanced=True, calibration="cross-fit")
    if variant.combination == "pooled" or not (variant.use_fractal or variant.use_natural):
        return dataclasses.replace(variant, combination="pooled", use_fractal=True, use_natural=True,
                                   lambda_fractal=1.0, lambda_natural=1.0, **plain)
    return dataclasses.replace(variant, **plain)


def fit_trunk(trunk: Stage2Config, rows: BankRows, train: torch.Tensor, stopping: torch.Tensor,
              layers: tuple[int, int], max_length: int) -> MoCaE:
    """A model fitted as Stage 2 fits it, on the ``train`` rows, early-stopping on the ``stopping`` rows."""
    model, data = build_model(trunk, rows.router[train], rows.calibrator[train], rows.labels[train], layers, max_length)
    train_mocae(model, data, rows.data(model, stopping), trunk, log=_silent)
    return model


def out_of_fold_parts(variant: Stage2Config, rows: BankRows, layers: tuple[int, int], max_length: int,
                      log=print) -> Parts | None:
    """The parts (log p, log q^frac, log q^nat, log u_max) of every fitting row (``~rows.calibration``), each
    predicted by a model fitted without its fold; None when some fold would leave an axis with too few rows to
    fit (then the caller keeps the hash split).

    A fold model early-stops on the hash calibration rows *outside* its left-out fold: rows of the left-out
    sources would tell it when it does well on them, and weaken the very shift the folds imitate.
    """
    trunk = trunk_of(variant)
    fitting = ~rows.calibration
    folds = rows.folds[fitting]
    out = None
    for k in range(FOLDS):
        held = folds == k
        if not held.any():
            continue
        train = fitting & (rows.folds != k)
        stopping = rows.calibration & (rows.folds != k)
        counts = torch.bincount(rows.labels[train], minlength=len(AXES))
        if int(counts.min()) < 8 or not stopping.any():
            return None
        model = fit_trunk(trunk, rows, train, stopping, layers, max_length)
        with torch.no_grad():
            out = model.parts(rows.data(model, fitting & (rows.folds == k))).scatter(len(folds), held, out)
    log(f"[stage2] {variant.name}: out-of-fold predictions over {FOLDS} source-group folds for the output head")
    return out


def routing_scores(log_w: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """NLL, ECE (15 bins) and the class-balanced NLL (the mean over axes of each axis's NLL)."""
    probs = log_w.exp()
    per_axis = [float(F.nll_loss(log_w[labels == a], labels[labels == a])) for a in labels.unique().tolist()]
    return {"nll": negative_log_likelihood(probs, labels), "ece": expected_calibration_error(probs, labels),
            "balanced_nll": sum(per_axis) / len(per_axis)}


def fold_fits(trunk: Stage2Config, rows: BankRows, k: int, layers: tuple[int, int], max_length: int,
              sources: tuple[str, ...] = CANDIDATES) -> dict | None:
    """What :func:`nested_scores` needs of one trunk for outer fold ``k``: the parts of fold k's rows from a model
    fitted on the other folds (``unseen``), and for each head source the parts and labels to fit a head on, from
    those other folds alone. None when the other folds are too small to fit."""
    held = rows.folds == k
    inner = rows.subset(~held)
    fitting = ~inner.calibration
    if int(torch.bincount(inner.labels[fitting], minlength=len(AXES)).min()) < 8 or not inner.calibration.any():
        return None
    model = fit_trunk(trunk, inner, fitting, inner.calibration, layers, max_length)
    out = {}
    if "cross-fit" in sources:
        inner_parts = out_of_fold_parts(trunk, inner, layers, max_length, log=_silent)
        if inner_parts is None:
            return None
        out["cross-fit"] = (inner_parts, inner.labels[fitting])
    with torch.no_grad():
        out["unseen"] = model.parts(rows.data(model, held))
        if "hash" in sources:
            out["hash"] = (model.parts(inner.data(model, inner.calibration)), inner.labels[inner.calibration])
    return out


def nested_scores(variants: list[Stage2Config], rows: BankRows, layers: tuple[int, int], max_length: int,
                  sources: tuple[str, ...] = ("cross-fit",), log=print,
                  fits=None) -> dict[tuple[str, str], dict[str, float]] | None:
    """Each variant's scores on source groups that neither its router nor its head saw, per way of fitting the
    head (``sources``: ``cross-fit`` = out-of-fold predictions over the remaining groups, ``hash`` = their hash
    calibration rows).

    For each source-group fold k: each trunk (:func:`trunk_of`) is fitted exactly as Stage 2 fits it, on the
    other folds' rows (early stopping on their calibration rows); each variant's head is fitted from those
    folds alone; every row of fold k then scores the calibrated router. Returns the mean over folds per
    (variant name, source), or None when the banks are too small to nest. Trunks are shared between variants;
    ``fits(trunk, k)`` may stand in for :func:`fold_fits` (a benchmark caches it).
    """
    fits = fits or (lambda trunk, k: fold_fits(trunk, rows, k, layers, max_length, sources))
    trunks = {config_key(trunk_of(v)): trunk_of(v) for v in variants}
    totals: dict[tuple[str, str], dict[str, list[float]]] = {}
    for k in range(FOLDS):
        held = rows.folds == k
        if not held.any():
            continue
        by_trunk = {key: fits(trunk, k) for key, trunk in trunks.items()}
        if any(fit is None for fit in by_trunk.values()):
            return None
        for variant in variants:
            fit = by_trunk[config_key(trunk_of(variant))]
            for source in sources:
                parts, labels = fit[source]
                head = fitted_head(variant, parts, labels)
                with torch.no_grad():
                    scores = routing_scores(log_weights(variant, head, fit["unseen"]), rows.labels[held])
                for metric, value in scores.items():
                    totals.setdefault((variant.name, source), {}).setdefault(metric, []).append(value)
        log(f"[stage2] nested source-group fold {k + 1}/{FOLDS} scored for {len(variants)} variant(s)")
    return {key: {metric: round(sum(v) / len(v), 5) for metric, v in values.items()} for key, values in totals.items()}


def nested_calibration_scores(variant: Stage2Config, rows: BankRows, layers: tuple[int, int], max_length: int,
                              log=print) -> dict[str, dict[str, float]] | None:
    """Each way of fitting the head (:data:`CANDIDATES`) scored on unseen source groups (:func:`nested_scores`)."""
    scores = nested_scores([variant], rows, layers, max_length, CANDIDATES, log=log)
    if scores is None:
        return None
    summary = {source: scores[(variant.name, source)] for source in CANDIDATES}
    log(f"[stage2] {variant.name}: nested source-group folds, calibrated NLL / ECE on unseen groups: "
        + ", ".join(f"{name} {s['nll']:.3f} / {s['ece']:.3f}" for name, s in summary.items()))
    return summary


def config_key(config: Stage2Config) -> tuple:
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in dataclasses.asdict(config).items()))


def _silent(*_) -> None:
    pass
