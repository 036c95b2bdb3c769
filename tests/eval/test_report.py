"""Which rate the report tells a reader to use follows the judges' own evidence."""

from alignx.axes import AXES
from alignx.eval.report import reading_advice, tables, terminal_summary


def test_reading_advice_follows_the_held_out_system_check():
    confusion = {"tp": 8, "fn": 2, "tn": 7, "fp": 3}
    results = {"judges": {
        "refusal": {"confusion": confusion, "points": {"refusal_rate_error": 23.1, "refusal_rate_corrected_error": 28.9}},
        "helpfulness": {"confusion": confusion, "points": {"helpfulness_rate_error": 9.0, "helpfulness_rate_corrected_error": 4.0}},
        "safety": {"confusion": confusion, "points": {}},
        "truth": {"judge": "openai:gpt-4o-mini", "accuracy": None},
    }}
    lines = reading_advice(results).splitlines()
    assert lines[0].startswith("- refusal: **raw**") and "28.9 points, the raw rate by up to 23.1" in lines[0]
    assert lines[1].startswith("- helpfulness: **corrected**")
    assert lines[2].startswith("- safety: **corrected**, unchecked")
    assert lines[3].startswith("- truth: raw only")


def test_corrected_tables_leave_out_a_judge_whose_correction_lost_and_flag_a_rejected_error_model():
    confusion = {"tp": 8, "fn": 2, "tn": 7, "fp": 3}
    metric = lambda value, **extra: {"value": value, "ci": [value - 0.1, value + 0.1], "n": 10, **extra}  # noqa: E731
    results = {
        "judges": {"refusal": {"confusion": confusion, "points": {"refusal_rate_error": 5.0, "refusal_rate_corrected_error": 9.0}},
                   "safety": {"confusion": confusion, "points": {}}},
        "methods": {"alignx": {"benchmarks": {
            "beavertails": {"unsafe_rate": metric(0.2, corrected=metric(-0.2, rejected=True))},
            "harmful": {"refusal_rate": metric(0.5, corrected=metric(0.6, rejected=False))}}}},
        "axis_collapse": {"alignx": {"relative": {a: None for a in AXES}, "misrouting": None}},
    }
    (title, header, rows, _), = [t for t in tables(results) if t[0].startswith("Rates corrected")]
    assert header == ["method", "unsafe"]  # refusal's correction missed held-out systems by more than raw: not shown
    assert rows == [["alignx", "-20.0† [-30.0, -10.0]"]]
    assert "0.0 [0.0, 0.0]" not in terminal_summary(results)
