"""The router: u = W_r·φ(h_r) + b, p = softmax(u / T) [paper shape: φ → R^1024, W_r ∈ R^{3×1024}, T = 1].

Regularise hard: on SmolLM2 features a plain L2-regularised linear router reached 0.82–0.85 held-out
accuracy with ECE 0.04–0.05, while an MLP was no more accurate and badly over-confident (ECE 0.14–0.19).
So the default φ is linear and (W_r, b) start at the class-balanced L2-regularised logistic-regression
solution (C = 0.01) on φ(h): training starts from the linear router that measured best and can only move
from there. ``phi="gelu"`` is the MLP variant for comparison.

What φ is depends on the feature size d against ``router_hidden``:

* d ≤ hidden (SmolLM2: 576 ≤ 1024): φ has orthonormal columns, an isometry that loses nothing, and the
  start is exactly the logistic regression on h itself (W_r = coef·φᵀ);
* d > hidden (a 7B model: 4096 > 1024): no linear map to fewer dimensions keeps everything, so φ projects
  onto the top-``hidden`` principal directions of the training features (the directions along which the
  prompts vary most), and the start is the logistic regression on those projected features. Raising
  ``stage2.router_hidden`` to d restores the isometry.
"""

from __future__ import annotations

import torch
from sklearn.linear_model import LogisticRegression
from torch import nn


class Router(nn.Module):
    def __init__(self, in_dim: int, num_axes: int, hidden: int = 1024, phi: str = "linear", temperature: float = 1.0):
        super().__init__()
        self.phi = nn.Linear(in_dim, hidden, bias=False)
        self.head = nn.Linear(hidden, num_axes)
        self.activation = nn.GELU() if phi == "gelu" else nn.Identity()
        self.temperature = temperature
        nn.init.orthogonal_(self.phi.weight)  # columns orthonormal when hidden >= in_dim: φ is an isometry

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(self.activation(self.phi(h))) / self.temperature

    def log_probs(self, h: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.logits(h), dim=-1)

    @torch.no_grad()
    def init_from_logistic_regression(self, h: torch.Tensor, labels: torch.Tensor, c: float, seed: int = 0) -> None:
        """Set φ (see the module docstring) and start (W_r, b) at the L2-regularised, class-balanced logistic
        regression on φ(h), so that the router's first output is exactly that regression's."""
        isometry = self.phi.out_features >= self.phi.in_features
        if not isometry:  # the top principal directions of the training features (rows orthonormal)
            _, _, directions = torch.linalg.svd((h - h.mean(0)).double(), full_matrices=False)
            self.phi.weight.copy_(directions[: self.phi.out_features].float())
        inputs = h if isometry else self.phi(h)  # an isometry: fit on h (cheaper, same optimum) and map below
        model = LogisticRegression(C=c, class_weight="balanced", max_iter=2000, random_state=seed)
        model.fit(inputs.double().numpy(), labels.numpy())
        coef = torch.from_numpy(model.coef_).float()
        intercept = torch.from_numpy(model.intercept_).float()
        if coef.shape[0] == 1:  # scikit-learn collapses two classes to one row
            coef, intercept = torch.cat([-coef, coef]) / 2, torch.cat([-intercept, intercept]) / 2
        # isometry: φ's columns P (hidden × d) are orthonormal, so W_r = coef·Pᵀ gives W_r·P·h = coef·h exactly
        self.head.weight.copy_((coef @ self.phi.weight.T if isometry else coef) * self.temperature)
        self.head.bias.copy_(intercept * self.temperature)
