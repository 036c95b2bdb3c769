"""The spaces the router and the calibrators work in.

Both feature kinds are standardised with the training banks' mean and standard deviation. The calibrator
then projects onto the top-k principal components (k = 256 [paper]) **without whitening**: whitening spreads
variance over directions that carry no axis information and destroys every local density signal
(measured). PCA is fitted with scikit-learn and applied as one matrix product in torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from sklearn.decomposition import PCA


@dataclass
class Standardiser:
    mean: torch.Tensor  # [d]
    std: torch.Tensor  # [d]

    @classmethod
    def fit(cls, features: torch.Tensor) -> "Standardiser":
        return cls(features.mean(0), features.std(0).clamp_min(1e-6))

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        return (features.float() - self.mean) / self.std


@dataclass
class Projection:
    """z = (x − μ) Vᵀ with the top-k principal directions V [k, d] (unwhitened)."""

    mean: torch.Tensor  # [d]
    components: torch.Tensor  # [k, d]

    @classmethod
    def fit(cls, features: torch.Tensor, k: int, seed: int = 0) -> "Projection":
        k = min(k, features.shape[1], len(features) - 1)
        pca = PCA(n_components=k, whiten=False, svd_solver="full", random_state=seed).fit(features.double().numpy())
        return cls(torch.from_numpy(pca.mean_).float(), torch.from_numpy(pca.components_).float())

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        return (features.float() - self.mean) @ self.components.T


@dataclass
class FeatureSpace:
    """Router features → standardised; calibrator features → standardised → PCA latent."""

    router: Standardiser
    calibrator: Standardiser
    projection: Projection

    @classmethod
    def fit(cls, router_features: torch.Tensor, calibrator_features: torch.Tensor, latent_dim: int, seed: int = 0):
        calibrator = Standardiser.fit(calibrator_features)
        return cls(Standardiser.fit(router_features), calibrator, Projection.fit(calibrator(calibrator_features), latent_dim, seed))

    def latent(self, calibrator_features: torch.Tensor) -> torch.Tensor:
        return self.projection(self.calibrator(calibrator_features))

    def state(self) -> dict[str, torch.Tensor]:
        return {
            "space.router_mean": self.router.mean, "space.router_std": self.router.std,
            "space.calibrator_mean": self.calibrator.mean, "space.calibrator_std": self.calibrator.std,
            "space.pca_mean": self.projection.mean, "space.pca_components": self.projection.components,
        }

    @classmethod
    def from_state(cls, t: dict[str, torch.Tensor]) -> "FeatureSpace":
        return cls(
            Standardiser(t["space.router_mean"], t["space.router_std"]),
            Standardiser(t["space.calibrator_mean"], t["space.calibrator_std"]),
            Projection(t["space.pca_mean"], t["space.pca_components"]),
        )
