"""The natural calibrator: semantic similarity to each axis in the model's own representation space.

q^nat = softmax(cos(h, μ_a) / τ_n), h the standardised router feature, μ_a the centroid of axis a's
standardised training features, τ_n learned (as log τ_n, so it stays positive). [ours]
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from scipy.optimize import minimize_scalar
from torch import nn


class NaturalCalibrator(nn.Module):
    def __init__(self, centroids: torch.Tensor, tau_init: float = 0.1):
        super().__init__()
        self.register_buffer("centroids", centroids.float())  # [A, d]
        self.log_tau = nn.Parameter(torch.tensor(math.log(tau_init)))

    @classmethod
    def fit(cls, h: torch.Tensor, labels: torch.Tensor, num_axes: int, tau_init: float = 0.1) -> "NaturalCalibrator":
        """Centroids of the training features, and τ_n started at its own maximum-likelihood value.

        Starting τ_n at the temperature that makes q^nat calibrated on its own (instead of an arbitrary
        constant) matters: the joint training is stopped early, often before τ_n would have moved far.
        """
        centroids = torch.stack([h[labels == a].mean(0) for a in range(num_axes)])
        calibrator = cls(centroids, tau_init)
        with torch.no_grad():
            similarities = calibrator.similarities(h)

        def nll(log_tau: float) -> float:
            return float(F.cross_entropy(similarities / math.exp(log_tau), labels))

        best = minimize_scalar(nll, bounds=(math.log(1e-3), math.log(10.0)), method="bounded")
        calibrator.log_tau.data.fill_(float(best.x))
        return calibrator

    def similarities(self, h: torch.Tensor) -> torch.Tensor:
        return F.normalize(h, dim=-1) @ F.normalize(self.centroids, dim=-1).T

    def log_probs(self, h: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.similarities(h) / self.log_tau.exp(), dim=-1)
