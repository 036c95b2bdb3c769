"""Metric functions against hand-computed values."""

import math

import pytest
import torch

from alignx.eval.metrics import (
    accuracy,
    brier_score,
    expected_calibration_error,
    misrouting_rates,
    negative_log_likelihood,
    reliability_bins,
)

PROBS = torch.tensor([[0.9, 0.05, 0.05], [0.62, 0.28, 0.1], [0.2, 0.7, 0.1], [0.1, 0.1, 0.8]])
LABELS = torch.tensor([0, 1, 1, 2])


def test_accuracy_and_misrouting():
    assert accuracy(PROBS, LABELS) == 0.75
    assert misrouting_rates(PROBS, LABELS, ["a", "b", "c"]) == {"a": 0.0, "b": 0.5, "c": 0.0}


def test_ece_by_hand():
    # bins of width 1/15: 0.9 -> bin 13 (0.8667, 0.9333], 0.62 -> bin 9 (0.6, 0.6667], 0.7 -> bin 10 (0.6667, 0.7333],
    # 0.8 -> bin 12 (0.7333, 0.8]; each bin holds one prediction: |acc - conf| = 0.1, 0.62, 0.3, 0.2
    expected = (0.1 + 0.62 + 0.3 + 0.2) / 4
    assert expected_calibration_error(PROBS, LABELS) == pytest.approx(expected)
    counts = [row["count"] for row in reliability_bins(PROBS, LABELS)]
    assert sum(counts) == 4 and counts[9] == counts[10] == counts[11] == counts[13] == 1


def test_ece_is_zero_when_confidence_matches_accuracy():
    probs = torch.tensor([[0.5, 0.5, 0.0]] * 4)
    labels = torch.tensor([0, 0, 1, 1])  # argmax is 0: half right at confidence 0.5
    assert expected_calibration_error(probs, labels) == pytest.approx(0.0)


def test_brier_and_nll_by_hand():
    brier = ((0.1**2 + 0.05**2 + 0.05**2) + (0.62**2 + 0.72**2 + 0.1**2) + (0.2**2 + 0.3**2 + 0.1**2) + (0.1**2 + 0.1**2 + 0.2**2)) / 4
    assert brier_score(PROBS, LABELS) == pytest.approx(brier)
    nll = -(math.log(0.9) + math.log(0.28) + math.log(0.7) + math.log(0.8)) / 4
    assert negative_log_likelihood(PROBS, LABELS) == pytest.approx(nll)
