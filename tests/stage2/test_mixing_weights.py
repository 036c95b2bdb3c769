"""The mixing weights made from the routing probabilities (stage2.mixing, stage2.base_axes)."""

import dataclasses

import pytest
import torch

from alignx.axes import AXES
from alignx.config import Stage2Config
from alignx.errors import AlignXError
from alignx.stage2.mixing_weights import mixing_weights

P = torch.tensor([[0.70, 0.20, 0.10], [0.10, 0.45, 0.45], [1e-12, 0.5, 0.5 - 1e-12]])


def _weights(**changes):
    return mixing_weights(P, dataclasses.replace(Stage2Config(base_axes=[]), **changes), list(AXES))


def test_soft_mixes_with_the_probabilities():
    assert torch.equal(_weights(mixing="soft"), P)


def test_power_sharpens_and_keeps_the_order_and_the_sum():
    w = _weights(mixing="power", mixing_power=3.0)
    expected = P**3 / (P**3).sum(1, keepdim=True)
    assert torch.allclose(w, expected, atol=1e-6)
    assert torch.equal(w.argmax(1), P.argmax(1))
    assert w[0, 0] > P[0, 0]  # the top axis gains
    assert torch.allclose(_weights(mixing="power", mixing_power=1.0), P, atol=1e-6)
    assert torch.isfinite(_weights(mixing="power", mixing_power=200.0)).all()  # no underflow to 0/0


def test_top1_puts_all_weight_on_the_most_probable_axis():
    assert torch.equal(_weights(mixing="top1"), torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 1, 0]]))


def test_a_base_axis_gives_its_share_to_the_base_model_not_to_the_other_experts():
    w = _weights(mixing="top1", base_axes=["helpful"])
    assert torch.equal(w[0], torch.zeros(3))  # routed to helpful: the base model alone
    soft = _weights(mixing="soft", base_axes=["helpful"])
    assert torch.allclose(soft[0], torch.tensor([0.0, 0.20, 0.10]))  # not renormalised: 0.7 of base remains


def test_the_default_gives_helpful_prompts_to_the_base_model():
    assert Stage2Config().base_axes == ["helpful"]  # chosen on training-fold evidence (docs/method.md#mixing-weights)


def test_bad_mixing_settings_are_explained():
    with pytest.raises(AlignXError, match="stage2.mixing must be one of"):
        Stage2Config(mixing="sharp")
    with pytest.raises(AlignXError, match="mixing_power must be > 0"):
        Stage2Config(mixing_power=0)
    with pytest.raises(AlignXError, match="stage2.base_axes must be one of"):
        Stage2Config(base_axes=["kind"])
