"""Calibration and routing metrics, computed from probabilities and gold labels.

ECE uses 15 equal-width confidence bins (the confidence of a prediction is its top probability);
Brier is the multi-class squared error summed over classes and averaged over examples; NLL is the mean
negative log-probability of the gold class.
"""

from __future__ import annotations

import torch


def accuracy(probs: torch.Tensor, labels: torch.Tensor) -> float:
    return float((probs.argmax(dim=1) == labels).float().mean())


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    confidence, predicted = probs.max(dim=1)
    correct = (predicted == labels).float()
    edges = torch.linspace(0, 1, bins + 1)
    # bin b holds confidences in (edges[b], edges[b+1]]; a confidence of exactly 0 joins the first bin
    index = (torch.bucketize(confidence, edges, right=False) - 1).clamp(0, bins - 1)
    total = 0.0
    for b in range(bins):
        members = index == b
        if members.any():
            total += float(members.float().mean()) * abs(float(correct[members].mean()) - float(confidence[members].mean()))
    return total


def reliability_bins(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> list[dict]:
    """Per bin: its range, count, mean confidence and accuracy (for reliability diagrams)."""
    confidence, predicted = probs.max(dim=1)
    correct = (predicted == labels).float()
    edges = torch.linspace(0, 1, bins + 1)
    index = (torch.bucketize(confidence, edges, right=False) - 1).clamp(0, bins - 1)
    rows = []
    for b in range(bins):
        members = index == b
        rows.append({
            "low": float(edges[b]), "high": float(edges[b + 1]), "count": int(members.sum()),
            "confidence": float(confidence[members].mean()) if members.any() else None,
            "accuracy": float(correct[members].mean()) if members.any() else None,
        })
    return rows


def brier_score(probs: torch.Tensor, labels: torch.Tensor) -> float:
    onehot = torch.nn.functional.one_hot(labels, probs.shape[1]).float()
    return float(((probs - onehot) ** 2).sum(dim=1).mean())


def negative_log_likelihood(probs: torch.Tensor, labels: torch.Tensor) -> float:
    return float(-probs.gather(1, labels[:, None]).clamp_min(1e-12).log().mean())


def misrouting_rates(probs: torch.Tensor, labels: torch.Tensor, axes: list[str]) -> dict[str, float]:
    """Per gold axis: the share of its prompts whose top weight goes to another axis."""
    predicted = probs.argmax(dim=1)
    return {axis: float((predicted[labels == a] != a).float().mean()) for a, axis in enumerate(axes) if (labels == a).any()}


def routing_metrics(probs: torch.Tensor, labels: torch.Tensor, axes: list[str]) -> dict:
    return {
        "accuracy": accuracy(probs, labels),
        "ece": expected_calibration_error(probs, labels),
        "brier": brier_score(probs, labels),
        "nll": negative_log_likelihood(probs, labels),
        "misrouting": misrouting_rates(probs, labels, axes),
        "n": int(len(labels)),
    }
