"""Output heads on synthetic logits: each recovers what generated the labels, and none is worse than a temperature."""

import math

import pytest
import torch

from alignx.stage2.heads import OutputHead, Parts, nll_temperature


def _sample(logits: torch.Tensor, seed: int = 0) -> torch.Tensor:
    return torch.multinomial(torch.softmax(logits, -1), 1, generator=torch.Generator().manual_seed(seed)).flatten()


def _nll(head, base, parts, labels):
    with torch.no_grad():
        return float(torch.nn.functional.nll_loss(head(base, parts), labels))


def test_temperature_head_recovers_the_temperature_that_generated_the_labels():
    base = 3 * torch.randn(20_000, 3, generator=torch.Generator().manual_seed(0))
    labels = _sample(base / 2.5)
    head = OutputHead(3, "temperature").fit(base, Parts(base), labels, class_balanced=False)
    assert head.temperature == pytest.approx(2.5, rel=0.05)
    assert head.temperature == pytest.approx(nll_temperature(base, labels), rel=1e-3)


def test_dirichlet_head_undoes_a_mixing_of_the_logits_that_a_temperature_cannot():
    base = 3 * torch.randn(20_000, 3, generator=torch.Generator().manual_seed(1))
    mixing = torch.tensor([[1.0, 0.8, 0.0], [0.0, 1.0, 0.0], [0.0, -0.6, 0.6]])
    labels = _sample(base @ mixing.T + torch.tensor([0.5, 0.0, -0.5]))
    parts = Parts(base)
    heads = {kind: OutputHead(3, kind).fit(base, parts, labels, class_balanced=False)
             for kind in ("temperature", "vector", "dirichlet")}
    nll = {kind: _nll(head, base, parts, labels) for kind, head in heads.items()}
    assert nll["dirichlet"] < nll["vector"] <= nll["temperature"] + 1e-6
    fitted = heads["dirichlet"].matrix  # identified up to a shift of each column (softmax ignores it)
    assert torch.allclose(fitted - fitted.mean(0), mixing - mixing.mean(0), atol=0.1)


def test_pooled_exponents_recover_a_product_of_experts():
    g = torch.Generator().manual_seed(2)
    router, fractal, natural = (torch.log_softmax(2 * torch.randn(20_000, 3, generator=g), -1) for _ in range(3))
    labels = _sample(0.7 * router + 1.5 * fractal + 0.0 * natural)
    parts = Parts(router, fractal, natural)
    head = OutputHead(3, "temperature", ("fractal", "natural")).fit(router, parts, labels, class_balanced=False)
    assert 1.0 / head.temperature == pytest.approx(0.7, abs=0.07)
    assert head.exponents.tolist() == pytest.approx([1.5, 0.0], abs=0.1)


def test_adaptive_temperature_flattens_atypical_prompts_and_keeps_every_top_axis():
    g = torch.Generator().manual_seed(3)
    base = 4 * torch.randn(20_000, 3, generator=g)
    log_u = torch.log(torch.rand(20_000, generator=g).clamp_min(1e-3))
    natural = torch.log_softmax(torch.randn(20_000, 3, generator=g), -1)  # carries nothing: its power stays ~0
    labels = _sample(base * torch.exp(0.5 * log_u)[:, None])  # atypical prompts' labels are noisier
    parts = Parts(base, natural=natural, typicality=log_u)
    head = OutputHead(3, "temperature", signals=("typicality", "natural")).fit(base, parts, labels, class_balanced=False)
    plain = OutputHead(3, "temperature").fit(base, parts, labels, class_balanced=False)
    assert head.powers.tolist() == pytest.approx([0.5, 0.0], abs=0.08)
    assert _nll(head, base, parts, labels) < _nll(plain, base, parts, labels)
    with torch.no_grad():
        assert torch.equal(head(base, parts).argmax(1), base.argmax(1))


def test_class_balanced_fit_weighs_each_axis_alike():
    g = torch.Generator().manual_seed(4)
    base = 3 * torch.randn(6000, 3, generator=g)
    labels = _sample(base)
    keep = (labels != 2) | (torch.rand(6000, generator=g) < 0.05)  # the third axis rare
    base, labels = base[keep], labels[keep]
    biased = base + torch.tensor([0.0, 0.0, -2.0])  # the rare axis under-predicted
    head = OutputHead(3, "vector").fit(biased, Parts(biased), labels, class_balanced=True)
    assert float(head.bias[2] - head.bias[:2].mean()) == pytest.approx(2.0, abs=0.5)
    assert not math.isnan(float(head.matrix.sum()))
