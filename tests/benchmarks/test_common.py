"""benchmarks/common.py's timing: ratios paired by round cancel the machine's slow spells, fastest-of-N keeps minima."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))  # as the benchmarks import it
import common  # noqa: E402


def fake_runs(cost_per_token: dict[str, float], spells: list[float], tokens: int):
    """Runs whose times are cost × the machine's speed factor of the moment: the factor changes every round
    (one call of the first run in each round's order advances it), as a shared machine's slow spells do."""
    clock = {"call": 0}
    per_round = 2 * len(cost_per_token)

    def run(name: str, n: int):
        def call() -> float:
            spell = spells[max(clock["call"] - per_round, 0) // per_round]  # the first round is the warm-up
            clock["call"] += 1
            return spell * (0.5 + cost_per_token[name] * n)

        return call

    return {name: (run(name, tokens), run(name, 1)) for name in cost_per_token}


def test_paired_ratios_cancel_a_slow_spell_that_minima_do_not():
    spells = [1.0, 1.0, 1.6, 1.6, 1.6]  # rounds 3-5 on a machine 60 % slower
    rounds = common.interleaved_rounds(fake_runs({"base": 1.0, "mixed": 1.2}, spells, 9), repeats=5, new_tokens=9)
    assert rounds.decode["base"] == pytest.approx([s * 1.0 for s in spells])
    ratio = rounds.ratio("mixed", "base")
    assert (ratio.median, ratio.low, ratio.high) == pytest.approx((1.2, 1.2, 1.2))
    assert rounds.fastest()["mixed"] == pytest.approx((1.2, 0.5 + 1.2))  # the fastest round's decode and prefill
    overhead = rounds.paired(lambda a, b: a - b, "mixed", "base")
    assert (overhead.low, overhead.high) == pytest.approx((0.2, 0.32))


def test_each_round_shuffles_the_order_of_the_runs():
    seen = []
    runs = {name: ((lambda name=name: seen.append(name) or 1.0), lambda: 0.5) for name in "abcd"}
    common.interleaved_rounds(runs, repeats=6, new_tokens=3, seed=1)
    orders = {tuple(seen[i:i + 4]) for i in range(4, len(seen), 4)}  # after the warm-up's fixed order
    assert len(orders) > 1 and all(sorted(order) == list("abcd") for order in orders)


def test_a_spread_prints_its_median_and_its_extremes():
    spread = common.Spread.of([1.3, 1.1, 1.2])
    assert str(spread) == "1.200 [1.100, 1.300]" and spread.as_dict() == {"median": 1.2, "low": 1.1, "high": 1.3}
