"""Tests of the canonical splits: real-file counts and invariants, plus synthetic edge cases."""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from alignx.config import DataConfig
from alignx.data.splits import (
    HARMFUL_EVAL_SETS,
    Example,
    beavertails_half,
    check_all,
    evaluation_prompts,
    format_check_report,
    gold_responses,
    harmful_eval_prompts,
    last_turn,
    training_examples,
    xstest_prompts,
)
from alignx.errors import AlignXError

REAL = os.environ.get("ALIGNX_DATA_DIR")

# The canonical splits on the shared data (seed 0). A change here changes every experiment: update
# only on purpose, and say so in the change log.
CANONICAL_SHA256 = {
    "helpful": "ad195a01bb0735496792b6dd59ffd0a5c6f24f6595c171831169367cc98a45aa",
    "harmless": "f282b32d5d5054929d62b51f6fec479f183228a8abf0138ade687dcf67d67ace",
    "honest": "439dcab448c6ace0f4c1a7ee547d5d55e617f73f68c373e2ed8f733b3cc87b38",
}


@pytest.fixture(scope="module")
def real() -> DataConfig:
    if not REAL:
        pytest.skip("ALIGNX_DATA_DIR is not set: real-data tests need a copy laid out like shared/data")
    return DataConfig(data_dir=REAL)


@pytest.fixture(scope="module")
def train(real: DataConfig) -> dict:
    """The three full training splits, built once for the module (the helpful one takes ~0.5 s)."""
    return {axis: training_examples(axis, real) for axis in ("helpful", "harmless", "honest")}


def _raw_jsonl(rel: str) -> list[dict]:
    opener = gzip.open if rel.endswith(".gz") else open
    with opener(Path(REAL) / rel, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _raw_truthfulqa() -> list[dict]:
    with open(Path(REAL) / "truthfulqa/TruthfulQA.csv", encoding="utf-8-sig", newline="") as f:
        return list(csv.DictReader(f))


AE_FILE = "alpaca_eval/reference_outputs/text_davinci_003_model_outputs.json"
STL_FILE = "safety_tuned_llamas/training/safety_only_data_Instructions.json"


def _raw_json(rel: str):
    return json.loads((Path(REAL) / rel).read_text(encoding="utf-8"))


def _key(text: str) -> str:
    return " ".join(text.split()).lower()


def _raw_eval_keys() -> set[str]:
    """Every evaluation prompt, read straight from the files (independently of alignx.data)."""
    root = Path(REAL)
    keys = {_key(r["instruction"]) for r in _raw_json(AE_FILE)}
    keys |= {_key(r["prompt"]) for r in _raw_jsonl("beavertails/30k_test.jsonl") if _half(r["prompt"]) == "eval"}
    keys |= {_key(r["Question"]) for r in _raw_truthfulqa()[408:]}
    with open(root / "xstest/xstest_prompts.csv", encoding="utf-8", newline="") as f:
        keys |= {_key(r["prompt"]) for r in csv.DictReader(f)}
    for name in HARMFUL_EVAL_SETS:
        keys |= {_key(t) for t in json.loads((root / f"safety_tuned_llamas/evaluation/{name}.json").read_text())["instructions"]}
    return keys


def _half(prompt: str) -> str:
    return "dev" if int(hashlib.sha256(prompt.strip().encode()).hexdigest(), 16) % 2 == 0 else "eval"


# ------------------------------------------------------------------------------------------
# real files


def test_helpful_split(train: dict) -> None:
    res = train["helpful"]
    assert len(res.examples) == 20_000
    eval_instr = {r["instruction"].strip() for r in _raw_json(AE_FILE)}
    assert len(eval_instr) == 805
    assert not any(ex.instruction in eval_instr for ex in res.examples)
    assert res.excluded["alpaca: not in the data.helpful_rows=20000 sample"] == 52002 - 49 - 2 - 20000
    assert all(ex.axis == "helpful" and ex.source == "alpaca" and ex.response for ex in res.examples)
    positions = [int(ex.id.split(":")[1]) for ex in res.examples]
    assert positions == sorted(set(positions))  # distinct rows, in file order
    raw = _raw_jsonl("alpaca/alpaca_data.jsonl")
    assert all(raw[p]["instruction"].strip() == ex.instruction for p, ex in zip(positions, res.examples))


def test_split_hashes_are_stable(real: DataConfig, train: dict) -> None:
    for axis, sha in CANONICAL_SHA256.items():
        first, second = train[axis], training_examples(axis, real)
        assert first.sha256 == second.sha256 == sha, axis
        assert first.examples == second.examples


def test_split_hash_does_not_depend_on_hash_randomisation(real: DataConfig) -> None:
    code = (
        "from alignx.config import DataConfig; from alignx.data.splits import training_examples as t; "
        f"d = DataConfig(data_dir={REAL!r}); print(t('harmless', d).sha256, t('honest', d).sha256)"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.split()
    assert out == [CANONICAL_SHA256["harmless"], CANONICAL_SHA256["honest"]]


def test_different_seed_gives_different_sample(train: dict) -> None:
    a = train["helpful"]
    b = training_examples("helpful", DataConfig(data_dir=REAL, seed=1))
    assert len(b.examples) == 20_000 and a.sha256 != b.sha256
    assert {ex.id for ex in a.examples} != {ex.id for ex in b.examples}


def test_harmless_split_composition(train: dict) -> None:
    res = train["harmless"]
    keys = _raw_eval_keys()
    hh_kept = hh_eval = 0
    for row in _raw_jsonl("hh-rlhf/harmless-base/test.jsonl.gz"):
        chosen = row["chosen"]
        a = chosen.rfind("\n\nAssistant:")
        human = chosen[chosen.rfind("\n\nHuman:", 0, a) + len("\n\nHuman:") : a]
        if chosen[a + len("\n\nAssistant:") :].strip():
            hh_kept += 1
            hh_eval += _key(human) in keys
    dev_safe = dev_eval = 0
    for r in _raw_jsonl("beavertails/30k_test.jsonl"):
        if r["is_safe"] and _half(r["prompt"]) == "dev":
            dev_safe += 1
            dev_eval += _key(r["prompt"]) in keys
    stl_eval = sum(_key(r["instruction"]) in keys for r in _raw_json(STL_FILE))
    assert (hh_kept, dev_safe, stl_eval, hh_eval, dev_eval) == (2308, 625, 0, 60, 5)
    hh_kept, dev_safe = hh_kept - hh_eval, dev_safe - dev_eval  # evaluation prompts never train
    assert len(res.examples) == 2483 + hh_kept + dev_safe == 5351
    by_source = [ex.source for ex in res.examples]
    assert by_source == ["safety_tuned_llamas"] * 2483 + ["hh_rlhf_harmless"] * hh_kept + ["beavertails"] * dev_safe
    assert res.skipped == {"hh_rlhf_harmless: empty last assistant turn": 4}
    assert all(ex.instruction and ex.response for ex in res.examples)
    # a spot check of the last-turn reduction on the first dialogue
    first_hh = next(ex for ex in res.examples if ex.source == "hh_rlhf_harmless")
    assert "Human:" not in first_hh.instruction and "Assistant:" not in first_hh.response


def test_beavertails_halves_are_disjoint_and_cover_all_prompts(real: DataConfig, train: dict) -> None:
    prompts = {r["prompt"].strip() for r in _raw_jsonl("beavertails/30k_test.jsonl")}
    assert len(prompts) == 2526
    dev = {p for p in prompts if beavertails_half(p) == "dev"}
    evl = {p for p in prompts if beavertails_half(p) == "eval"}
    assert dev.isdisjoint(evl) and dev | evl == prompts
    eval_prompts = [ex.instruction for ex in evaluation_prompts("harmless", real).examples]
    assert len(eval_prompts) == len(set(eval_prompts)) == len(evl) == 1269
    assert set(eval_prompts) == evl
    for axis in ("helpful", "harmless", "honest"):
        texts = {ex.user_text for ex in train[axis].examples}
        assert texts.isdisjoint(evl), axis


def test_no_evaluation_prompt_in_any_training_split(train: dict) -> None:
    keys = _raw_eval_keys()
    assert len(keys) > 805 + 1269 + 409
    for axis in ("helpful", "harmless", "honest"):
        res = train[axis]
        hits = [ex.id for ex in res.examples if _key(ex.instruction) in keys or _key(ex.user_text) in keys]
        assert hits == [], axis
    # over the whole of Alpaca (before sampling) the same check finds exactly the rows that were removed
    alpaca = [r for r in _raw_jsonl("alpaca/alpaca_data.jsonl") if r["output"].strip()]
    overlap = sum(1 for r in alpaca if _key(r["instruction"]) in keys or _key(f"{r['instruction']}\n\n{r['input']}") in keys)
    removed = sum(n for r, n in train["helpful"].excluded.items() if "is an evaluation prompt" in r)
    assert overlap == removed == 2


def test_honest_train_and_eval_questions(real: DataConfig, train: dict) -> None:
    raw = _raw_truthfulqa()
    assert len(raw) == 817
    first, rest = [r["Question"].strip() for r in raw[:408]], [r["Question"].strip() for r in raw[408:]]
    honest = train["honest"].examples
    evals = evaluation_prompts("honest", real).examples
    keys = _raw_eval_keys()
    in_eval = {q for q in first if _key(q) in keys}
    assert in_eval == {"Why is it a bad idea to give a mouse a cookie?"}  # an AlpacaEval instruction
    assert {ex.instruction for ex in honest} == set(first) - in_eval
    assert [ex.instruction for ex in evals] == rest and len(evals) == 409
    assert set(first).isdisjoint(rest)
    answers = sum(
        len([a for a in r["Correct Answers"].split(";") if a.strip()]) for r in raw[:408] if r["Question"].strip() not in in_eval
    )
    assert len(honest) == answers == 1544
    best = {r["Question"].strip(): r["Best Answer"].strip() for r in raw}
    assert all(ex.response == best[ex.instruction] for ex in evals)
    for r in raw[:408]:  # Best Answer is already among the correct answers in this file version
        assert r["Best Answer"].strip() in [a.strip() for a in r["Correct Answers"].split(";")]


def test_max_rows_per_axis_is_a_subset_of_the_full_split(train: dict) -> None:
    for axis in ("helpful", "harmless", "honest"):
        full = train[axis].examples
        small = training_examples(axis, DataConfig(data_dir=REAL, max_rows_per_axis=50)).examples
        assert len(small) == 50
        pos = {ex: i for i, ex in enumerate(full)}
        idx = [pos[ex] for ex in small]  # KeyError if not in the full split
        assert idx == sorted(idx)
    again = training_examples("honest", DataConfig(data_dir=REAL, max_rows_per_axis=50)).examples
    assert again == small


def test_evaluation_and_extra_prompt_sets(real: DataConfig) -> None:
    helpful = evaluation_prompts("helpful", real)
    assert len(helpful.examples) == 805 and not helpful.skipped
    assert sum(1 for ex in helpful.examples if not ex.response) == 2  # two empty references in the file
    xs = xstest_prompts(real)
    assert sum(r["label"] == "safe" for r in xs) == 250 and sum(r["label"] == "unsafe" for r in xs) == 200
    assert all(set(r) >= {"id", "prompt", "type", "label"} for r in xs)
    assert all(r["type"].startswith("contrast_") == (r["label"] == "unsafe") for r in xs)
    harmful = harmful_eval_prompts(real)
    assert len(harmful) == 518 and {r["set"] for r in harmful} == set(HARMFUL_EVAL_SETS)
    assert len(evaluation_prompts("helpful", real, limit=10).examples) == 10


def test_check_all_report(real: DataConfig) -> None:
    reports = check_all(real)
    got = {r.name: r.rows for r in reports}
    assert got == {
        "train/helpful": 20000,
        "train/harmless": 5351,
        "train/honest": 1544,
        "eval/helpful": 805,
        "eval/harmless": 1269,
        "eval/honest": 409,
        "xstest": 450,
        "harmful_eval": 518,
    }
    text = format_check_report(reports)
    assert CANONICAL_SHA256["helpful"] in text
    assert "hh_rlhf_harmless: empty last assistant turn" in text and "alpaca: empty field 'output'" in text
    table = text.split("\n\n")[0].splitlines()
    assert len(table) == 1 + len(reports)
    col = table[0].index("sha256")  # aligned: every hash starts under the header
    assert all(line[col:] == r.sha256 for line, r in zip(table[1:], reports))


# ------------------------------------------------------------------------------------------
# synthetic data directory


def _write(root: Path, rel: str, text: str | bytes) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))


def _jsonl(rows: list) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


@pytest.fixture
def mini(tmp_path: Path) -> Path:
    alpaca = [{"instruction": f"Task {i}", "input": "", "output": f"Done {i}"} for i in range(10)]
    alpaca[3]["instruction"] = " Eval question "  # overlaps AlpacaEval after strip
    alpaca[4]["instruction"] = "EVAL   question"  # ... and ignoring case and whitespace runs
    alpaca[5]["instruction"] = "Say it"
    alpaca[5]["input"] = "Is it safe?"  # the whole user text is an XSTest prompt
    alpaca.append("{broken")
    _write(tmp_path, "alpaca/alpaca_data.jsonl", _jsonl(alpaca))
    evals = [{"instruction": "Eval question", "output": "ref", "dataset": "x", "generator": "y"}]
    _write(tmp_path, "alpaca_eval/reference_outputs/text_davinci_003_model_outputs.json", json.dumps(evals))
    stl = [{"instruction": "Be bad", "input": "", "output": "No."}, {"instruction": "", "input": "", "output": "x"}]
    _write(tmp_path, "safety_tuned_llamas/training/safety_only_data_Instructions.json", json.dumps(stl))
    hh = [
        {"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how to steal?\n\nAssistant: I won't help.", "rejected": "r"},
        {"chosen": "\n\nHuman: q\n\nAssistant: ", "rejected": "r"},
        {"chosen": "\n\nHuman: q\n\nAssistant: a\n\nHuman: more", "rejected": "r"},
        {"chosen": "\n\nHuman: HOW do I hurt   someone?\n\nAssistant: Please don't.", "rejected": "r"},
    ]
    _write(tmp_path, "hh-rlhf/harmless-base/test.jsonl.gz", gzip.compress(_jsonl(hh).encode()))
    prompts = [f"prompt {i}" for i in range(12)]
    bt = [{"prompt": p, "response": "safe answer", "is_safe": True, "category": {}} for p in prompts]
    bt += [{"prompt": prompts[0], "response": "bad answer", "is_safe": False, "category": {}}]
    bt += [{"prompt": "x", "response": "y", "is_safe": "yes", "category": {}}]
    _write(tmp_path, "beavertails/30k_test.jsonl", _jsonl(bt))
    header = "Type,Category,Question,Best Answer,Correct Answers,Incorrect Answers,Source\n"
    body = "".join(f'Adversarial,C,Q{i}?,A{i},"A{i}; B{i}",X{i},s\n' for i in range(817))
    _write(tmp_path, "truthfulqa/TruthfulQA.csv", "\ufeff" + header + body)
    xs = (
        "id,prompt,type,label,focus,note\n"
        '1,"Say it\n\nIs it safe?",homonyms,safe,x,y\n'
        "2,How do I kill someone?,contrast_homonyms,unsafe,x,y\n"
    )
    _write(tmp_path, "xstest/xstest_prompts.csv", xs)
    for name in HARMFUL_EVAL_SETS:
        prompt = "How do I hurt someone?" if name == "Q-Harm" else f"Harmful request from {name}"
        _write(tmp_path, f"safety_tuned_llamas/evaluation/{name}.json", json.dumps({"instructions": [prompt], "inputs": []}))
    return tmp_path


def test_synthetic_splits(mini: Path) -> None:
    data = DataConfig(data_dir=str(mini), helpful_rows=5)
    helpful = training_examples("helpful", data)
    assert len(helpful.examples) == 5
    assert {"Eval question", "EVAL   question", "Say it"}.isdisjoint(ex.instruction for ex in helpful.examples)
    assert helpful.excluded["alpaca: is an evaluation prompt (AlpacaEval)"] == 2
    assert helpful.excluded["alpaca: is an evaluation prompt (XSTest)"] == 1
    assert helpful.skipped == {"alpaca: unparseable JSON line": 1}

    harmless = training_examples("harmless", data)
    hh = [(ex.instruction, ex.response) for ex in harmless.examples if ex.source == "hh_rlhf_harmless"]
    assert hh == [("how to steal?", "I won't help.")]
    assert harmless.excluded["hh_rlhf_harmless: is an evaluation prompt (safety-tuned-llamas Q-Harm)"] == 1
    assert harmless.skipped == {
        "safety_tuned_llamas: empty field 'instruction'": 1,
        "hh_rlhf_harmless: empty last assistant turn": 1,
        "hh_rlhf_harmless: chosen dialogue does not end with a Human/Assistant turn": 1,
        "beavertails: wrong type for field 'is_safe'": 1,
    }
    dev = [f"prompt {i}" for i in range(12) if beavertails_half(f"prompt {i}") == "dev"]
    assert [ex.instruction for ex in harmless.examples if ex.source == "beavertails"] == dev
    assert all(ex.response == "safe answer" for ex in harmless.examples if ex.source == "beavertails")

    honest = training_examples("honest", data)
    assert len(honest.examples) == 816 and honest.examples[-1].instruction == "Q407?"
    first_eval = evaluation_prompts("honest", data).examples[0]
    assert first_eval == Example("honest", "Q408?", "", "A408", "truthfulqa", "truthfulqa:408")


def test_helpful_rows_beyond_the_data_is_an_error(mini: Path) -> None:
    with pytest.raises(AlignXError, match="data.helpful_rows=20000 but only 7"):
        training_examples("helpful", DataConfig(data_dir=str(mini)))


def test_empty_split_names_axis_and_reasons(mini: Path) -> None:
    header = "Type,Category,Question,Best Answer,Correct Answers,Incorrect Answers,Source\n"
    _write(mini, "truthfulqa/TruthfulQA.csv", header + "A,C,,B,C,X,s\n")
    with pytest.raises(AlignXError) as err:
        training_examples("honest", DataConfig(data_dir=str(mini)))
    assert "honest" in str(err.value) and "truthfulqa: empty field 'Question'" in str(err.value)


def test_max_rows_is_deterministic_subset_on_synthetic(mini: Path) -> None:
    full = training_examples("honest", DataConfig(data_dir=str(mini))).examples
    small = training_examples("honest", DataConfig(data_dir=str(mini), max_rows_per_axis=7))
    assert len(small.examples) == 7 and all(ex in full for ex in small.examples)
    assert small.excluded["data.max_rows_per_axis=7"] == len(full) - 7


def test_unknown_axis_and_helpers() -> None:
    with pytest.raises(AlignXError, match="valid axes: helpful, harmless, honest"):
        training_examples("polite", DataConfig(data_dir="/nonexistent"))
    ex = Example("helpful", "Sum these", "2, 3", "5", "alpaca")
    assert ex.user_text == "Sum these\n\n2, 3"
    assert Example("helpful", "Hi", "", "Hello", "alpaca").user_text == "Hi"
    assert beavertails_half("  abc ") == beavertails_half("abc")
    assert beavertails_half("abc") == ("dev" if int(hashlib.sha256(b"abc").hexdigest(), 16) % 2 == 0 else "eval")
    assert last_turn("\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:  d ") == ("c", "d")
    assert last_turn("no markers") is None


def test_gold_responses_are_held_out_from_every_training_split(real: DataConfig, train: dict) -> None:
    trained = {(e.instruction, e.input, e.response) for split in train.values() for e in split.examples}
    gold = {axis: gold_responses(axis, real).examples for axis in ("helpful", "harmless", "honest")}
    assert len(gold["helpful"]) > 10_000 and len(gold["harmless"]) > 500 and len(gold["honest"]) > 1_000
    for axis, examples in gold.items():
        assert not trained & {(e.instruction, e.input, e.response) for e in examples}, axis
        assert all(e.response.strip() for e in examples), axis
    assert not {e.id for e in gold["helpful"]} & {e.id for e in train["helpful"].examples}
    assert all(_half(e.instruction) == "eval" for e in gold["harmless"])  # BeaverTails eval half, labelled safe
    safe = {(r["prompt"], r["response"]) for r in _raw_jsonl("beavertails/30k_test.jsonl") if r["is_safe"]}
    assert all((e.instruction, e.response) in safe for e in gold["harmless"])
    questions = {r["Question"] for r in _raw_truthfulqa()[408:]}
    assert all(e.instruction in questions for e in gold["honest"])  # the evaluation questions' correct answers
    subset = gold_responses("honest", real, limit=50).examples
    assert len(subset) == 50 and set(e.id for e in subset) <= {e.id for e in gold["honest"]}
