"""The natural calibrator: semantic similarity to each axis in the model's own representation space.

q^nat = softmax(cos(h, μ_a) / τ_n), h the standardised router feature, μ_a the centroid of axis a's
standardised training features, τ_n learned (as log τ_n, so it stays positive). [ours]
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class NaturalCalibrator(nn.Module):
    def __init__(self, centroids: torch.Tensor, tau_init: float = 0.1):
        super().__init__()
        self.register_buffer("centroids", centroids.float())  # [A, d]
        self.log_tau = nn.Parameter(torch.tensor(math.log(tau_init)))

    @classmethod
    def fit(cls, h: torch.Tensor, labels: torch.Tensor, num_axes: int, tau_init: float = 0.1) -> "NaturalCalibrator":
        centroids = torch.stack([h[labels == a].mean(0) for a in range(num_axes)])
        return cls(centroids, tau_init)

    def similarities(self, h: torch.Tensor) -> torch.Tensor:
        return F.normalize(h, dim=-1) @ F.normalize(self.centroids, dim=-1).T

    def log_probs(self, h: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.similarities(h) / self.log_tau.exp(), dim=-1)
