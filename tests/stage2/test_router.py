"""The router's start: the logistic regression on φ(h), whether φ can be an isometry (d <= hidden) or not."""

import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression

from alignx.stage2.router import Router


def _features(d: int, n_per_axis: int = 100, seed: int = 0):
    """Three overlapping clusters in d dimensions, standardised as Stage 2 standardises them."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(3, d, generator=g)
    labels = torch.arange(3).repeat_interleave(n_per_axis)
    h = centres[labels] + 1.5 * torch.randn(len(labels), d, generator=g)
    return (h - h.mean(0)) / h.std(0), labels


def _logistic_log_probs(inputs: np.ndarray, labels: torch.Tensor) -> torch.Tensor:
    model = LogisticRegression(C=0.01, class_weight="balanced", max_iter=2000, random_state=0).fit(inputs, labels.numpy())
    return torch.from_numpy(model.predict_log_proba(inputs)).float()


@pytest.mark.parametrize(("d", "hidden"), [(24, 64), (24, 24), (64, 16)])
def test_the_router_starts_at_the_logistic_regression_on_phi(d, hidden):
    h, labels = _features(d)
    router = Router(d, 3, hidden)
    router.init_from_logistic_regression(h, labels, c=0.01)
    phi = router.phi.weight
    if hidden >= d:  # an isometry: the start is the regression on h itself
        torch.testing.assert_close(phi.T @ phi, torch.eye(d), atol=1e-5, rtol=0)
        expected = _logistic_log_probs(h.double().numpy(), labels)
    else:  # d > hidden: φ is the top-`hidden` principal directions (orthonormal rows), the start the regression on them
        torch.testing.assert_close(phi @ phi.T, torch.eye(hidden), atol=1e-5, rtol=0)
        expected = _logistic_log_probs(PCA(n_components=hidden).fit_transform(h.double().numpy()), labels)
    with torch.no_grad():
        start = router.log_probs(h)
    assert float((start - expected).abs().max()) < 1e-3  # the solver's tolerance, on log-probabilities near 1


def test_a_wide_model_keeps_the_directions_its_prompts_vary_along():
    # features that vary along 8 of 64 directions: a narrow router must keep those, not a random 16 of 64
    g = torch.Generator().manual_seed(1)
    basis, _ = torch.linalg.qr(torch.randn(64, 8, generator=g))
    labels = torch.arange(3).repeat_interleave(100)
    signal = torch.randn(3, 8, generator=g)[labels] * 3 + torch.randn(300, 8, generator=g)
    h = signal @ basis.T + 0.01 * torch.randn(300, 64, generator=g)
    router = Router(64, 3, hidden=16)
    router.init_from_logistic_regression(h, labels, c=0.01)
    kept = torch.linalg.matrix_norm(router.phi.weight.detach() @ basis) ** 2 / 8  # share of the signal subspace kept
    assert float(kept) > 0.99
    with torch.no_grad():
        assert float((router.log_probs(h).argmax(1) == labels).float().mean()) > 0.95
