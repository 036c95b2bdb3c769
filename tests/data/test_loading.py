"""Reading a source's rows: skipped rows counted by reason, file errors naming the setting, the cache, and the
online fallbacks (the hub and URL fetches are faked: no network needed)."""

from __future__ import annotations

import gzip
import json
import sys
import types
import urllib.request
from pathlib import Path

import pytest

from alignx.data import loading
from alignx.data.loading import clear_cache, load_source
from alignx.errors import AlignXError


def write(root: Path, rel: str, text: str | bytes) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------
# local files


def test_jsonl_bad_rows_are_skipped_and_counted(tmp_path: Path) -> None:
    lines = [
        json.dumps({"instruction": " Say hi ", "input": "", "output": "hi"}),
        "{not json",
        json.dumps({"instruction": "No output"}),
        json.dumps({"instruction": "   ", "input": "", "output": "x"}),
        json.dumps({"instruction": "Typed", "input": "", "output": 5}),
        json.dumps([1, 2]),
        "",
        json.dumps({"instruction": "Add", "input": "2 and 3", "output": "5"}),
        json.dumps({"instruction": "No input key", "output": "ok"}),
    ]
    write(tmp_path, "alpaca/alpaca_data.jsonl", "\n".join(lines) + "\n")
    res = load_source("alpaca", tmp_path)
    assert [r["instruction"] for r in res.rows] == ["Say hi", "Add", "No input key"]
    assert [r["index"] for r in res.rows] == [0, 6, 7]  # positions count rejected rows, not blank lines
    assert res.rows[1]["input"] == "2 and 3" and res.rows[2]["input"] == ""
    assert res.skipped == {
        "unparseable JSON line": 1,
        "missing field 'output'": 1,
        "empty field 'instruction'": 1,
        "wrong type for field 'output'": 1,
        "row is not a JSON object": 1,
    }


def test_json_list_and_gzip_and_columns(tmp_path: Path) -> None:
    stl = [{"instruction": "Do harm", "input": "", "output": "No."}, {"instruction": "x", "output": None}, "junk"]
    write(tmp_path, "safety_tuned_llamas/training/safety_only_data_Instructions.json", json.dumps(stl))
    res = load_source("safety_tuned_llamas", tmp_path)
    assert len(res.rows) == 1 and res.skipped == {"missing field 'output'": 1, "row is not a JSON object": 1}

    dialogues = [{"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"}, {"chosen": ""}]
    data = gzip.compress("\n".join(json.dumps(d) for d in dialogues).encode())
    write(tmp_path, "hh-rlhf/harmless-base/test.jsonl.gz", data)
    res = load_source("hh_rlhf_harmless", tmp_path)
    assert res.rows[0]["chosen"].startswith("\n\nHuman: ")  # dialogue markers are kept intact
    assert res.skipped == {"empty field 'chosen'": 1}

    cols = {"instructions": ["Insult me", "", "Hurt them", 7], "tags": ["a", "b", "c", "d"], "inputs": []}
    write(tmp_path, "safety_tuned_llamas/evaluation/I-MaliciousInstructions.json", json.dumps(cols))
    res = load_source("stl_eval:I-MaliciousInstructions", tmp_path)
    assert [(r["instruction"], r["tag"], r["input"]) for r in res.rows] == [("Insult me", "a", ""), ("Hurt them", "c", "")]
    assert res.skipped == {"empty field 'instruction'": 1, "wrong type for field 'instruction'": 1}


def test_truthfulqa_csv_with_bom_keeps_file_positions(tmp_path: Path) -> None:
    header = "Type,Category,Question,Best Answer,Correct Answers,Incorrect Answers,Source\n"
    body = (
        'Adversarial,Misc,Q1?,A1,"A1; A1b ;",X1,s\n'
        "Adversarial,Misc,,A2,A2,X2,s\n"  # empty question
        'Adversarial,Misc,Q3?,A3,"A3;  ; A3c",X3,s\n'
        "Adversarial,Misc,Q4?,A4,;,X4,s\n"  # no correct answer left after dropping empty pieces
    )
    write(tmp_path, "truthfulqa/TruthfulQA.csv", "\ufeff" + header + body)
    res = load_source("truthfulqa", tmp_path)
    assert [r["question"] for r in res.rows] == ["Q1?", "Q3?"]
    assert [r["index"] for r in res.rows] == [0, 2]
    assert res.rows[0]["correct_answers"] == ["A1", "A1b"] and res.rows[1]["correct_answers"] == ["A3", "A3c"]
    assert res.skipped == {"empty field 'Question'": 1, "empty field 'Correct Answers'": 1}


def test_missing_file_names_file_and_setting(tmp_path: Path) -> None:
    (tmp_path / "alpaca").mkdir()
    with pytest.raises(AlignXError) as err:
        load_source("alpaca", tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "alpaca" / "alpaca_data.jsonl") in msg
    assert "ALIGNX_DATA_DIR" in msg and "data.data_dir" in msg


def test_missing_data_dir_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(AlignXError, match="ALIGNX_DATA_DIR"):
        load_source("alpaca", tmp_path / "nope")
    write(tmp_path, "hh-rlhf/harmless-base/test.jsonl.gz", b"not gzip at all")
    with pytest.raises(AlignXError, match=r"test\.jsonl\.gz.*ALIGNX_DATA_DIR"):
        load_source("hh_rlhf_harmless", tmp_path)
    write(tmp_path, "safety_tuned_llamas/training/safety_only_data_Instructions.json", "[{broken")
    with pytest.raises(AlignXError, match="safety_only_data_Instructions.json is not valid JSON"):
        load_source("safety_tuned_llamas", tmp_path)
    write(tmp_path, "alpaca_eval/reference_outputs/text_davinci_003_model_outputs.json", '{"a": 1}')
    with pytest.raises(AlignXError, match="JSON list"):
        load_source("alpaca_eval", tmp_path)
    write(tmp_path, "alpaca/alpaca_data.jsonl", b"\xff\xfe\x00bad utf8")
    with pytest.raises(AlignXError, match="alpaca_data.jsonl"):
        load_source("alpaca", tmp_path)


def test_cache_is_keyed_on_file_and_refreshes_on_change(tmp_path: Path) -> None:
    clear_cache()
    path = write(tmp_path, "alpaca/alpaca_data.jsonl", json.dumps({"instruction": "a", "output": "b"}) + "\n")
    first = load_source("alpaca", tmp_path)
    first.rows.clear()  # callers get their own list
    hits = loading._load_cached.cache_info().hits
    assert len(load_source("alpaca", tmp_path).rows) == 1
    assert loading._load_cached.cache_info().hits == hits + 1
    path.write_text(path.read_text() + json.dumps({"instruction": "c", "output": "d"}) + "\n")
    assert len(load_source("alpaca", tmp_path).rows) == 2


# ------------------------------------------------------------------------------------------
# online


def _fake_datasets(monkeypatch: pytest.MonkeyPatch, loader) -> list[tuple]:
    calls: list[tuple] = []

    def load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return loader(*args, **kwargs)

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    return calls


def _offline_url(monkeypatch: pytest.MonkeyPatch) -> None:
    def urlopen(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)


def test_offline_hub_failure_says_how_to_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    clear_cache()

    def fail(*args, **kwargs):
        raise ConnectionError("offline")

    calls = _fake_datasets(monkeypatch, fail)
    _offline_url(monkeypatch)
    with pytest.raises(AlignXError) as err:
        load_source("beavertails", None)
    assert "ALIGNX_DATA_DIR" in str(err.value) and "online" in str(err.value)
    assert calls == [(("PKU-Alignment/BeaverTails",), {"split": "30k_test"})]
    with pytest.raises(AlignXError, match="ALIGNX_DATA_DIR"):  # hub fails, pinned URL fails too
        load_source("alpaca_eval", None)
    with pytest.raises(AlignXError, match="only available from a local copy.*ALIGNX_DATA_DIR"):
        load_source("pku_saferlhf", None)


def test_hub_rows_are_normalised_like_the_files(monkeypatch: pytest.MonkeyPatch) -> None:
    clear_cache()
    rows = [
        {
            "type": "Adversarial",
            "category": "Misconceptions",
            "question": "Q?",
            "best_answer": "B",
            "correct_answers": ["B", " C "],
            "incorrect_answers": ["X"],
            "source": "s",
        },
        {"question": "Q2?", "best_answer": "", "correct_answers": ["B"], "incorrect_answers": ["X"]},
    ]
    calls = _fake_datasets(monkeypatch, lambda *a, **k: rows)
    res = load_source("truthfulqa", None)
    assert calls == [(("truthfulqa/truthful_qa", "generation"), {"split": "validation"})]
    assert res.rows == [
        {
            "index": 0,
            "question": "Q?",
            "best_answer": "B",
            "correct_answers": ["B", "C"],
            "incorrect_answers": ["X"],
            "type": "Adversarial",
            "category": "Misconceptions",
            "source": "s",
        }
    ]
    assert res.skipped == {"empty field 'best_answer'": 1}
    calls.clear()
    load_source("hh_rlhf_harmless", None)
    assert calls == [(("Anthropic/hh-rlhf",), {"split": "test", "data_dir": "harmless-base"})]
    clear_cache()
