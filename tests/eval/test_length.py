"""Equal-length pairs: a judge that looks only at length reads 0.50, and saying next to nothing cannot win."""

import numpy as np
import pytest
from scipy.stats import norm

from alignx.eval.length import MIN_TOKENS, equal_length_pair, token_ids
from alignx.eval.statistics import rate, win_outcomes


def words(n: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(rng.choice(["apple", "river", "stone", "light", "quiet", "a", "of", "the", "tomorrow"], n))


def test_both_texts_are_cut_to_the_shorter_ones_tokens_but_never_below_the_floor(tiny_tokenizer):
    long, short = words(200, 0), words(30, 1)
    mine, theirs = equal_length_pair(tiny_tokenizer, short, long)
    assert mine == short and len(token_ids(tiny_tokenizer, theirs)) == pytest.approx(len(token_ids(tiny_tokenizer, short)), abs=1)
    mine, theirs = equal_length_pair(tiny_tokenizer, long, short)  # a longer answer is cut to a short reference
    assert theirs == short and long.startswith(mine) and len(mine) < len(long)
    mine, theirs = equal_length_pair(tiny_tokenizer, "No.", long)  # under the floor: whole, against MIN_TOKENS
    assert mine == "No." and len(token_ids(tiny_tokenizer, theirs)) == pytest.approx(MIN_TOKENS, abs=1)


def _pure_length_judge(rng, response: list[str], reference: list[str]) -> np.ndarray:
    """P(answer preferred) from the log ratio of the two texts' characters alone (a probit, not the logistic
    form any fit here assumes), then a coin with that probability."""
    x = np.log(np.array([len(a) + 1 for a in response]) / np.array([len(b) + 1 for b in reference]))
    return win_outcomes((rng.random(len(x)) < norm.cdf(x / 0.3)).astype(float))


def test_a_pure_length_judge_reads_one_half_on_equal_length_pairs(tiny_tokenizer):
    # answers cut at 48 tokens (most at the cap, some finished short) against references mostly longer than that:
    # the setting of the study
    rng = np.random.default_rng(0)
    n = 400
    references = [words(int(n_words), 100 + i) for i, n_words in enumerate(np.exp(rng.normal(np.log(70), 0.6, n)))]
    capped = rng.random(n) < 0.6
    answers = [words(38 if cap else int(rng.integers(4, 30)), 1000 + i) for i, cap in enumerate(capped)]
    pairs = [equal_length_pair(tiny_tokenizer, a, r) for a, r in zip(answers, references)]
    equal = _pure_length_judge(rng, [a for a, _ in pairs], [r for _, r in pairs])
    assert rate(equal) == pytest.approx(0.5, abs=0.06)
    whole = _pure_length_judge(rng, answers, references)
    assert rate(whole) < 0.35  # against the whole reference the length-biased judge sinks every short answer


def test_a_constant_short_answer_cannot_score_high(tiny_tokenizer):
    rng = np.random.default_rng(1)
    references = [words(int(k), 200 + i) for i, k in enumerate(rng.integers(20, 150, 300))]
    pairs = [equal_length_pair(tiny_tokenizer, "I am not sure.", r) for r in references]
    assert rate(_pure_length_judge(rng, [a for a, _ in pairs], [r for _, r in pairs])) < 0.1
