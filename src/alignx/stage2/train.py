"""Fitting MoCaE: its parts from the bank features (:func:`build_model`), then φ, W_r, b and τ_n by
cross-entropy of w against each prompt's gold axis (:func:`train_mocae`).

AdamW, batch 64 and weight decay 0.01 [paper]; class-balanced weights (the helpful bank is ~13× the
honest one); early stopping on the calibration split's NLL. The experts stay frozen: training touches
only the router and the natural calibrator, on precomputed features, so an epoch over 25,000 prompts
takes about a second on a CPU. The output head (T_out, or the pooled exponents) is fitted afterwards, by
:func:`fit_head`, on the predictions the pipeline chooses (see :mod:`.crossfit`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from alignx.axes import AXES
from alignx.config import Stage2Config
from alignx.stage2.feature_space import FeatureSpace
from alignx.stage2.fractal import FractalCalibrator
from alignx.stage2.heads import OutputHead, Parts
from alignx.stage2.mocae import MoCaE, RoutingData, base_logits, head_for, parts_for
from alignx.stage2.natural import NaturalCalibrator
from alignx.stage2.router import Router


def build_model(config: Stage2Config, train_router, train_calibrator, train_labels, layers: tuple[int, int],
                max_length: int) -> tuple[MoCaE, RoutingData]:
    """Fit the feature space and calibrators on the training part of the banks; return the model and its data."""
    torch.manual_seed(config.seed)
    space = FeatureSpace.fit(train_router, train_calibrator, config.latent_dim, config.seed)
    h = space.router(train_router)
    fractal = None
    typicality = None
    if config.use_fractal:
        z = space.latent(train_calibrator)
        fractal = FractalCalibrator.fit(
            [z[train_labels == a] for a in range(len(AXES))],
            epsilon=config.epsilon, epsilon_mode=config.epsilon_mode, neighbour_fraction=config.neighbour_fraction,
            min_neighbours=config.min_neighbours, dimension_neighbours=config.dimension_neighbours,
            dimension_weight=config.dimension_weight, bank_dtype=config.bank_dtype,
        )
        # training points are bank points: score each against its own cloud leave-one-out (labels are sorted)
        typicality = fractal.typicality(z, own_axis=train_labels)
    router = Router(h.shape[1], len(AXES), config.router_hidden, config.router_phi, config.router_temperature)
    if config.router_phi == "linear":
        router.init_from_logistic_regression(h, train_labels, config.router_init_c, config.seed)
    natural = NaturalCalibrator.fit(h, train_labels, len(AXES), config.natural_tau_init) if config.use_natural else None
    model = MoCaE(config, list(AXES), space, router, natural, fractal, layers, max_length)
    return model, RoutingData(h, typicality, train_labels)


@dataclass(frozen=True)
class BankRows:
    """All axes' bank rows stacked: features, gold axis, hash calibration split and source-group fold."""

    router: torch.Tensor
    calibrator: torch.Tensor
    labels: torch.Tensor
    calibration: torch.Tensor  # bool: in the hash calibration split (early stopping; T_out with ``hash``)
    folds: torch.Tensor  # source-group fold of each row (see crossfit)

    def data(self, model: MoCaE, mask: torch.Tensor) -> RoutingData:
        return model.data_for(self.router[mask], self.calibrator[mask], self.labels[mask])

    def subset(self, mask: torch.Tensor) -> "BankRows":
        return BankRows(self.router[mask], self.calibrator[mask], self.labels[mask], self.calibration[mask], self.folds[mask])


def calibration_nll(model: MoCaE, data: RoutingData, *, calibrated: bool = False) -> float:
    with torch.no_grad():
        return float(F.nll_loss(model(data, calibrated=calibrated), data.labels))


def train_mocae(model: MoCaE, train: RoutingData, calibration: RoutingData, config: Stage2Config, log=print) -> list[dict]:
    """Fit the trainable parts of ``model`` in place; returns the per-epoch history."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    num_axes = len(model.axes)
    counts = torch.bincount(train.labels, minlength=num_axes).float().clamp_min(1)
    class_weights = (len(train.labels) / (num_axes * counts)) if config.class_balanced else None
    generator = torch.Generator().manual_seed(config.seed)
    best = (calibration_nll(model, calibration), copy.deepcopy(model.state_dict()), 0)
    history = [{"epoch": 0, "train_loss": None, "calibration_nll": round(best[0], 5)}]
    stale = 0
    for epoch in range(1, config.max_epochs + 1):
        model.train()
        order = torch.randperm(len(train.labels), generator=generator)
        total, seen = 0.0, 0
        for start in range(0, len(order), config.batch_size):
            batch = train.subset(order[start : start + config.batch_size])
            loss = F.nll_loss(model(batch, calibrated=False), batch.labels, weight=class_weights)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(batch.labels)
            seen += len(batch.labels)
        model.eval()
        nll = calibration_nll(model, calibration)
        history.append({"epoch": epoch, "train_loss": round(total / seen, 5), "calibration_nll": round(nll, 5)})
        if nll < best[0] - 1e-4:
            best, stale = (nll, copy.deepcopy(model.state_dict()), epoch), 0
        else:
            stale += 1
            if stale >= config.patience:
                break
    model.load_state_dict(best[1])
    log(f"[stage2] {config.name}: best calibration NLL {best[0]:.4f} at epoch {best[2]} of {history[-1]['epoch']}")
    return history


def fitted_head(variant: Stage2Config, parts: Parts, labels: torch.Tensor) -> OutputHead:
    """``variant``'s output head fitted on ``parts`` (predictions of models fitted like it, on rows they never
    saw) against ``labels``, class-balanced with ``stage2.head_class_balanced``."""
    head = head_for(variant, parts.router.shape[1])
    used = parts_for(variant, parts)
    return head.fit(base_logits(variant, used), used, labels, variant.head_class_balanced)


def fit_head(model: MoCaE, parts: Parts, labels: torch.Tensor) -> dict:
    """Fit ``model``'s output head (:func:`fitted_head`); returns the fitted values."""
    model.head = fitted_head(model.config, parts, labels)
    return model.head.describe()
