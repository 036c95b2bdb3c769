"""HHH metric functions against hand-computed cases."""

import numpy as np
import pytest

from alignx.eval.statistics import (
    Sample, bootstrap_ci, corrected_cells, corrected_rate, length_controlled_win_rate, mean_with_ci,
    paired_corrected_difference, paired_difference, rate, win_outcomes, with_ci,
)


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


# ---------------------------------------------------------------------------------------------- judge error
def _verdicts_of(truth: np.ndarray, sensitivity: float, specificity: float) -> np.ndarray:
    """Verdicts of a judge with exactly these rates on ``truth`` (the first share of each class is flipped)."""
    said = truth.copy()
    positives, negatives = np.flatnonzero(truth), np.flatnonzero(~truth)
    said[positives[: round((1 - sensitivity) * len(positives))]] = False
    said[negatives[: round((1 - specificity) * len(negatives))]] = True
    return said


def test_rogan_gladen_recovers_the_true_rate_behind_a_noisy_judge():
    truth = np.arange(1000) < 100  # 10 % truly unsafe
    said = _verdicts_of(truth, 0.8, 0.7)
    assert said.mean() == pytest.approx(0.35)  # the example: 10 % reads as 35 %
    confusion = {"tp": 80, "fn": 20, "tn": 70, "fp": 30}  # a validation set with the same rates
    result = corrected_rate(said, [confusion], resamples=200, seed=0)
    assert result["value"] == pytest.approx(0.10)
    assert result["ci"][0] < 0.10 < result["ci"][1]
    assert result["judges"] == [{"sensitivity": 0.8, "specificity": 0.7, "n_validation": 200}]
    # the interval includes the judge's own uncertainty: a small validation set widens it
    small = corrected_rate(said, [{"tp": 8, "fn": 2, "tn": 7, "fp": 3}], resamples=200, seed=0)
    assert small["ci"][1] - small["ci"][0] > 1.5 * (result["ci"][1] - result["ci"][0])


def test_a_perfect_judge_needs_no_correction_and_a_chance_judge_cannot_be_corrected():
    said = np.arange(50) < 20
    exact = corrected_rate(said, [{"tp": 30, "fn": 0, "tn": 30, "fp": 0}], resamples=50, seed=0)
    assert exact["value"] == pytest.approx(0.4)
    assert np.isnan(corrected_cells(said[:, None], [(0.6, 0.4)])).all()  # sensitivity + specificity = 1


def test_a_raw_rate_below_the_false_positive_rate_is_flagged_not_clipped_to_certainty():
    # sensitivity 0.8, specificity 0.7: a judge that says "unsafe" for 30 % of safe answers. 20 % raw is
    # impossible under that error model; clipping printed 0.0 [0.0, 0.0], certainty the data do not hold
    confusion = {"tp": 80, "fn": 20, "tn": 70, "fp": 30}
    said = np.arange(200) < 40
    result = corrected_rate(said, [confusion], resamples=300, seed=0)
    assert result["value"] == pytest.approx((0.2 - 0.3) / 0.5) and result["rejected"]
    assert result["ci"][0] < result["value"] < result["ci"][1] and result["ci"][1] - result["ci"][0] > 0.1
    assert not corrected_rate(np.arange(200) < 100, [confusion], resamples=50, seed=0)["rejected"]
    # a difference between two such methods keeps its sign and size: the raw difference over Youden's J
    fewer = np.arange(200) < 24
    difference = paired_corrected_difference(fewer, said, [confusion], 300, 0)
    assert difference["value"] == pytest.approx(-0.08 / 0.5) and difference["excludes_zero"]


def test_joint_correction_recovers_both_labels_positive():
    rng = np.random.default_rng(0)
    truthful = rng.random(20000) < 0.6
    informative = np.where(truthful, rng.random(20000) < 0.5, rng.random(20000) < 0.9)  # dependent labels
    rates = [(0.85, 0.75), (0.9, 0.6)]
    said_t = np.where(truthful, rng.random(20000) < rates[0][0], rng.random(20000) > rates[0][1])
    said_i = np.where(informative, rng.random(20000) < rates[1][0], rng.random(20000) > rates[1][1])
    cells = corrected_cells(np.column_stack([said_t, said_i]), rates)
    assert cells.sum() == pytest.approx(1.0)
    assert cells[-1] == pytest.approx(np.mean(truthful & informative), abs=0.02)
    assert np.mean(said_t & said_i) - np.mean(truthful & informative) > 0.05  # the raw TI rate is off


def _flags(x):
    return Sample({"flags": np.asarray(x, dtype=float)}, rate)


def test_paired_difference_sees_a_small_consistent_gain_that_unpaired_intervals_cannot():
    # 200 items of very different difficulty; method b solves exactly the items a solves plus 12 more
    rng = np.random.default_rng(1)
    a = (rng.random(200) < 0.5).astype(float)
    b = a.copy()
    b[np.flatnonzero(a == 0)[:12]] = 1.0
    one, two = with_ci({"flags": a}, rate, 1000, 0), with_ci({"flags": b}, rate, 1000, 0)
    assert one["ci"][1] > two["ci"][0]  # the two intervals overlap ...
    paired = paired_difference([_flags(b)], [_flags(a)], 1000, 0)
    assert paired["value"] == pytest.approx(12 / 200)
    assert paired["excludes_zero"] and 0 < paired["ci"][0] <= paired["value"] <= paired["ci"][1]  # ... the pairing does not
    with pytest.raises(ValueError, match="same items"):
        paired_difference([_flags(a)], [_flags(a[:10])], 10, 0)


def test_a_mean_over_benchmarks_resamples_each_on_its_own():
    parts = [_flags([1, 1, 0, 0]), _flags([1] * 10), _flags([0, 0, 0, 1, 1, 1])]
    result = mean_with_ci(parts, 300, 0)
    assert result["value"] == pytest.approx((0.5 + 1.0 + 0.5) / 3) and result["n"] == [4, 10, 6]
    assert result["ci"][0] < result["value"] < result["ci"][1]
    difference = paired_difference(parts, [_flags([0, 1, 0, 0]), _flags([1] * 10), _flags([0] * 6)], 300, 0)
    assert difference["value"] == pytest.approx((0.25 + 0 + 0.5) / 3)


def test_paired_corrected_difference_divides_the_raw_difference_by_youden_j():
    confusion = {"tp": 400, "fn": 100, "tn": 350, "fp": 150}  # sensitivity 0.8, specificity 0.7: J = 0.5
    rng = np.random.default_rng(0)
    a = rng.random(300) < 0.6
    b = a.copy()
    b[np.flatnonzero(~a)[:30]] = True  # 10 more points of raw positives
    result = paired_corrected_difference(b, a, [confusion], 300, 0)
    assert result["value"] == pytest.approx(0.10 / 0.5)
    assert result["excludes_zero"] and result["ci"][0] > 0


def test_answers_that_share_a_question_are_resampled_together():
    # 40 questions, five near-identical gold answers each: 200 answers carry the information of 40 questions
    rng = np.random.default_rng(0)
    per_question = rng.normal(0, 1, 40)
    loss = np.repeat(per_question, 5) + rng.normal(0, 0.01, 200)
    questions = np.repeat(np.arange(40), 5)
    zeros = np.zeros(200)
    mean = lambda nll: float(nll.mean())  # noqa: E731
    grouped = paired_difference([Sample({"nll": loss}, mean, questions)], [Sample({"nll": zeros}, mean, questions)], 500, 0)
    loose = paired_difference([Sample({"nll": loss}, mean)], [Sample({"nll": zeros}, mean)], 500, 0)
    width = lambda r: r["ci"][1] - r["ci"][0]  # noqa: E731
    assert width(grouped) == pytest.approx(2 * 1.96 * per_question.std() / np.sqrt(40), rel=0.25)
    assert width(grouped) > 1.8 * width(loose)  # answers as the unit: an interval sqrt(5) too narrow
