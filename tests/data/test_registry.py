"""The source registry: every source named and laid out, and the real data sets loading completely."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from alignx.data.loading import load_source
from alignx.data.registry import SOURCES, get_source
from alignx.errors import AlignXError

REAL = os.environ.get("ALIGNX_DATA_DIR")


@pytest.fixture
def real_dir() -> Path:
    if not REAL:
        pytest.skip("ALIGNX_DATA_DIR is not set: real-data tests need a copy laid out like shared/data")
    return Path(REAL)


def test_unknown_source_lists_valid_names() -> None:
    with pytest.raises(AlignXError) as err:
        load_source("alpacca", None)
    msg = str(err.value)
    assert "alpacca" in msg
    for name in ("alpaca", "alpaca_eval", "beavertails", "hh_rlhf_harmless", "safety_tuned_llamas", "truthfulqa", "xstest"):
        assert name in msg


def test_every_source_has_a_known_layout() -> None:
    for name, source in SOURCES.items():
        assert source.name == name
        assert not source.path.startswith("/") and source.fmt in ("jsonl", "jsonl.gz", "json_list", "json_columns", "csv")


def test_get_source_names_the_valid_ones() -> None:
    assert get_source("alpaca").path == "alpaca/alpaca_data.jsonl"
    with pytest.raises(AlignXError, match="unknown data source 'alpacca'; valid sources: alpaca, "):
        get_source("alpacca")


# ------------------------------------------------------------------------------------------
# real files


def test_real_sources_load_completely(real_dir: Path) -> None:
    expect = {  # rows kept, rows in the file
        "alpaca": (51953, 52002),  # 49 rows with an empty output are skipped
        "alpaca_eval": (805, 805),
        "beavertails": (3021, 3021),
        "hh_rlhf_harmless": (2312, 2312),
        "safety_tuned_llamas": (2483, 2483),
        "truthfulqa": (817, 817),
        "xstest": (450, 450),
    }
    for name, (kept, total) in expect.items():
        res = load_source(name, real_dir)
        assert len(res.rows) == kept, name
        assert len(res.rows) + sum(res.skipped.values()) == total, name
    assert load_source("alpaca", real_dir).skipped == {"empty field 'output'": 49}


def test_real_truthfulqa_best_answer_is_a_correct_answer(real_dir: Path) -> None:
    rows = load_source("truthfulqa", real_dir).rows
    assert len(rows) == 817
    missing = [r["index"] for r in rows if r["best_answer"] not in r["correct_answers"]]
    assert missing == []  # so the honest split needs no separate Best Answer row


def test_real_judge_and_eval_only_sources(real_dir: Path) -> None:
    counts = {
        "stl_eval:I-MaliciousInstructions": 100,
        "stl_eval:I-CoNa": 178,
        "stl_eval:I-Controversial": 40,
        "stl_eval:Q-Harm": 100,
        "stl_eval:I-PhysicalSafetyUnsafe": 100,
        "pku_saferlhf": 2000,
        "xstest_completions:gpt4": 450,
        "truthfulqa_mc": 817,
    }
    for name, n in counts.items():
        assert len(load_source(name, real_dir).rows) == n, name
    truth = load_source("truthfulqa_finetune_truth", real_dir)
    assert len(truth.rows) == 22434 and not truth.skipped
    assert {r["label"] for r in truth.rows} == {True, False}
