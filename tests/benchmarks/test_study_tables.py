"""benchmarks/study_tables.py: each verdict rule on per-item results built to sit where the old rules erred."""

import gzip
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from alignx.axes import AXES
from alignx.eval.benchmarks import BENCHMARKS
from alignx.eval.runner import method_samples, results_of
from alignx.eval.statistics import paired_difference

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "study_tables.py"
spec = importlib.util.spec_from_file_location("study_tables", SCRIPT)
study_tables = importlib.util.module_from_spec(spec)
spec.loader.exec_module(study_tables)

N = 100
JUDGED = {"alpacaeval": ("helpfulness", "helpfulness@equal_length"), "beavertails": ("safety",), "harmful": ("refusal",),
          "xstest_safe": ("refusal",), "truthfulqa": ("truth", "info")}
METHODS = ("alignx", "base", "sft-mix", "moe-uncalibrated", "oracle", *(f"expert-{a}" for a in AXES))


def flags(*positive: int) -> np.ndarray:
    x = np.zeros(N)
    x[list(positive)] = 1.0
    return x


def method_rows(p: dict[str, dict[str, np.ndarray]], routed: dict | None = None) -> dict:
    """A method's rows per benchmark from its judge probabilities; ``routed``: ``{"weights": [N, 3], "ood": [N]}``."""
    out = {}
    for benchmark, names in JUDGED.items():
        rows = []
        for i in range(N):
            row = {"id": f"{benchmark}:{i}", "response": f"answer {i}", "tokens": 10, "at_cap": False,
                   "scores": {name: float(p.get(benchmark, {}).get(name, np.full(N, 0.2))[i]) for name in names}}
            if benchmark == "alpacaeval":
                row["equal_length"] = {"response": f"answer {i}", "reference": f"reference {i}"}
            if routed is not None and BENCHMARKS[benchmark].gold_axis is not None:
                row["weights"] = dict(zip(AXES, map(float, routed["weights"][i])))
                row["ood"] = bool(routed["ood"][i])
                if "probabilities" in routed:
                    row["probabilities"] = dict(zip(AXES, map(float, routed["probabilities"][i])))
            rows.append(row)
        out[benchmark] = rows
    return out


def study(overrides: dict[str, dict] | None = None, routing: dict[str, dict] | None = None, resamples: int = 200) -> dict:
    """Every method alike (the same verdicts on every item), but for ``overrides``: method -> benchmark -> name -> p."""
    overrides, routing = overrides or {}, routing or {}
    items = {b: [{"id": f"{b}:{i}", "prompt": f"prompt {i}", **({"reference": f"reference {i}"} if b == "alpacaeval" else {})}
                 for i in range(N)] for b in JUDGED}
    confusion = {"tp": 80, "fn": 20, "tn": 70, "fp": 30}
    return {"format": study_tables.FORMAT, "eval": {
        "format": 1, "suite": "quick", "generation": {"max_new_tokens": 48}, "keys": {}, "reference": "alignx",
        "bootstrap": {"resamples": resamples, "level": 0.95, "seed": 0},
        "judges": {task: {"judge": "test", "confusion": confusion} for task in ("helpfulness", "safety", "refusal", "truth", "info")},
        "items": items,
        "methods": {m: method_rows(overrides.get(m, {}), routing.get(m)) for m in METHODS}}}


def test_a_is_multiplicity_controlled_where_the_best_expert_picked_and_tested_on_the_same_items_failed():
    # expert-harmless is judged safe on 5 more of 100 BeaverTails answers than alignx, every other figure equal:
    # a 95 % interval excludes 0 (the old rule: "fails"), the 9-test Bonferroni interval does not
    unsafe_alignx = flags(*range(30))
    data = study({"alignx": {"beavertails": {"safety": unsafe_alignx}},
                  **{m: {"beavertails": {"safety": unsafe_alignx}} for m in METHODS if m not in ("alignx", "expert-harmless")},
                  "expert-harmless": {"beavertails": {"safety": flags(*range(25))}}})
    samples = method_samples(data["eval"])
    old = paired_difference([samples["expert-harmless"]["beavertails"]["safe_rate"].sample],
                            [samples["alignx"]["beavertails"]["safe_rate"].sample], 2000, 0)
    assert old["value"] == pytest.approx(0.05) and old["ci"][0] > 0
    line = study_tables.verdict_a(samples, 2000, 0)
    assert "**holds**" in line and "9 expert × axis tests" in line
    # a difference the family-wise test does see
    data = study({"expert-harmless": {"beavertails": {"safety": flags(*range(10))}},
                  **{m: {"beavertails": {"safety": unsafe_alignx}} for m in METHODS if m != "expert-harmless"}})
    assert "**fails**" in study_tables.verdict_a(method_samples(data["eval"]), 2000, 0)


def test_b_is_decided_in_code():
    better = {"beavertails": {"safety": flags(*range(40))}, "truthfulqa": {"truth": flags(*range(60, 100))}}
    worse = {"beavertails": {"safety": flags(*range(70))}, "truthfulqa": {"truth": flags(*range(0, 100))}}
    holds = study({"sft-mix": worse, "moe-uncalibrated": worse, **{m: better for m in METHODS if m not in study_tables.RIVALS}})
    assert "(b) alignx beats sft-mix and moe-uncalibrated on the HHH mean: **holds**" in study_tables.verdict_b(results_of(holds["eval"], log=lambda *_: None))
    fails = study({"sft-mix": worse, **{m: better for m in METHODS if m != "sft-mix"}})
    line = study_tables.verdict_b(results_of(fails["eval"], log=lambda *_: None))
    assert "**fails**" in line and "moe-uncalibrated − alignx = +0.0" in line and "(not separated from alignx)" in line


def test_c_compares_the_two_routers_on_the_same_items():
    # both routers give the same weights wherever both route; alignx's gate sends 20 items to its fallback, and there
    # moe-uncalibrated is confidently wrong. The old rule compared alignx on its 80 with moe-uncalibrated on all 100.
    weights = np.tile([0.6, 0.3, 0.1], (N, 1))
    wrong = weights.copy()
    wrong[:20] = [0.0, 0.02, 0.98]
    ood = np.arange(N) < 20
    data = study(routing={"alignx": {"weights": weights, "ood": ood}, "moe-uncalibrated": {"weights": wrong, "ood": np.zeros(N, bool)}})
    fit = study_tables.ece_reduction(data["eval"], 500, 0)
    assert fit["n"] == 4 * 80  # four benchmarks with a gold axis, the 80 items neither gate sent away
    assert fit["value"] == pytest.approx(0.0, abs=1e-6)
    assert "**fails**" in study_tables.verdict_c(data["eval"], 500, 0)


def test_calibration_is_measured_on_the_probabilities_not_on_the_sharpened_mixing_weights():
    probabilities = np.tile([0.6, 0.3, 0.1], (N, 1))
    one_hot = np.tile([1.0, 0.0, 0.0], (N, 1))  # top-1 mixing of the same probabilities
    calm = {"weights": one_hot, "probabilities": probabilities, "ood": np.zeros(N, bool)}
    data = study(routing={"alignx": calm, "moe-uncalibrated": {"weights": probabilities, "ood": np.zeros(N, bool)}})
    assert study_tables.ece_reduction(data["eval"], 200, 0)["value"] == pytest.approx(0.0, abs=1e-6)
    results = study_tables.results_of(data["eval"], log=lambda *_: None)
    assert results["methods"]["alignx"]["routing"]["ece"] == pytest.approx(results["methods"]["moe-uncalibrated"]["routing"]["ece"])


def test_d_is_one_sided_over_refusing_less_than_base_passes():
    less = study({"base": {"xstest_safe": {"refusal": flags(*range(30))}}, "alignx": {"xstest_safe": {"refusal": flags(*range(15))}}})
    assert "**holds**" in study_tables.verdict_d(method_samples(less["eval"]), 1000, 0)  # |−15| > 10: the old rule failed it
    more = study({"base": {"xstest_safe": {"refusal": flags(*range(5))}}, "alignx": {"xstest_safe": {"refusal": flags(*range(14))}}})
    assert "**fails**" in study_tables.verdict_d(method_samples(more["eval"]), 1000, 0)  # +9 points, but not shown below 10


def test_e_reports_a_gap_and_never_calls_the_oracle_a_bound():
    # the oracle behind alignx (judged unsafe on 10 more answers): what a bound could never be
    data = study({"oracle": {"beavertails": {"safety": flags(*range(10))}}})
    line = study_tables.verdict_e(results_of(data["eval"], log=lambda *_: None), None)
    assert line.startswith("(e) the gap to the oracle (oracle − alignx): HHH mean -3.3") and "not a bound" in line


def test_an_expert_beats_base_only_where_its_paired_interval_on_its_own_axis_is_above_zero():
    # base judged unsafe on 40 BeaverTails answers the harmless expert answered safely; the helpful expert as base
    data = study({"base": {"beavertails": {"safety": flags(*range(40))}}})
    rows = {row[0]: row for row in study_tables.experts_against_base(method_samples(data["eval"]), 1000, 0)}
    assert rows["expert-harmless"][1:4] == ["beavertails safe_rate", "100.0", "60.0"]
    assert rows["expert-harmless"][4].startswith("+40.0") and rows["expert-harmless"][5] == "yes"
    assert rows["expert-helpful"][4] == "+0.0 [+0.0, +0.0]" and rows["expert-helpful"][5] == "no"


def test_the_committed_file_regenerates_the_same_tables(tmp_path):
    data = study({"sft-mix": {"beavertails": {"safety": flags(*range(40))}}})
    path = tmp_path / "results.json.gz"
    path.write_bytes(gzip.compress(json.dumps(data).encode()))
    done = subprocess.run([sys.executable, str(SCRIPT), "--results", str(path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == study_tables.report(data).strip()
    for title in ("## Results", "## Verdicts", "## Power", "## Answers cut at the token cap", "## Each expert against base"):
        assert title in done.stdout
    assert "- (a) no Axis Collapse" in done.stdout and "- (e) the gap to the oracle" in done.stdout
