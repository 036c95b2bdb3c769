"""Which rate the report tells a reader to use follows the judges' own evidence."""

from alignx.eval.report import reading_advice


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
