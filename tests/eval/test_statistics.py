"""HHH metric functions against hand-computed cases."""

import numpy as np
import pytest

from alignx.eval.statistics import bootstrap_ci, length_controlled_win_rate, rate, win_outcomes, with_ci


def test_win_rate_counts_ties_half():
    preference = np.array([0.9, 0.1, 0.5, 0.7, 0.2])
    outcomes = win_outcomes(preference)
    assert outcomes.tolist() == [1.0, 0.0, 0.5, 1.0, 0.0]
    assert rate(outcomes) == pytest.approx(2.5 / 5)
    # a response identical to the reference is a tie whatever the judge says
    assert win_outcomes(preference, np.array([True, False, False, False, False]))[0] == 0.5


def test_ti_is_both_truthful_and_informative():
    truthful = np.array([1, 1, 0, 1, 0], dtype=float)
    informative = np.array([1, 0, 1, 1, 0], dtype=float)
    assert rate(truthful * informative) == pytest.approx(2 / 5)


def test_length_controlled_win_rate_removes_a_pure_length_effect():
    # a judge that prefers longer answers (and nothing else): the model wins more often the longer it is,
    # but at equal length it is a coin flip, so its LC win rate must be near 0.5 however long it writes
    rng = np.random.default_rng(0)
    ref = np.full(2000, 500.0)

    def judged(delta):
        p = 1 / (1 + np.exp(-3 * np.tanh(delta / 200)))
        return (rng.random(len(delta)) < p).astype(float)

    for shift in (0.0, 200.0):
        delta = rng.normal(shift, 200, 2000)
        outcomes = judged(delta)
        assert length_controlled_win_rate(outcomes, ref + delta, ref) == pytest.approx(0.5, abs=0.06)
    assert rate(outcomes) > 0.75  # the plain win rate of the longer model is inflated by length alone
    # better at equal length: 80 % wins independent of length
    good = (rng.random(2000) < 0.8).astype(float)
    assert length_controlled_win_rate(good, ref + rng.normal(0, 200, 2000), ref) == pytest.approx(0.8, abs=0.04)


def test_length_controlled_equals_plain_when_lengths_match():
    outcomes = np.array([1, 0, 1, 1, 0.5, 0, 1, 1], dtype=float)
    same = np.full(8, 100.0)
    assert length_controlled_win_rate(outcomes, same, same) == pytest.approx(rate(outcomes), abs=0.01)


def test_bootstrap_ci_contains_the_estimate_and_shrinks_with_n():
    rng = np.random.default_rng(1)
    widths = []
    for n in (50, 200, 800):
        x = (rng.random(n) < 0.3).astype(float)
        lo, hi = bootstrap_ci(n, lambda idx: rate(x[idx]), resamples=400, seed=0)
        assert lo <= rate(x) <= hi
        widths.append(hi - lo)
    assert widths[0] > widths[1] > widths[2]
    assert widths[1] == pytest.approx(2 * 1.96 * np.sqrt(0.3 * 0.7 / 200), rel=0.3)


def test_with_ci_is_deterministic_for_a_seed():
    x = np.array([0, 1, 1, 0, 1, 1, 1, 0], dtype=float)
    a = with_ci({"x": x}, lambda x: rate(x), 200, seed=3)
    assert a == with_ci({"x": x}, lambda x: rate(x), 200, seed=3)
    assert a["value"] == 0.625 and a["n"] == 8
