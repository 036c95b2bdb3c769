"""Row parsers: one raw record of a source file (or hub row) -> a normalised dict, or :class:`Skip`.

Each parser takes ``(record, position in file)`` and returns a dict with normalised field names and stripped
text, or raises :class:`Skip` with the reason the row is counted under. Which source uses which parser is
:mod:`alignx.data.registry`; reading files and hub rows is :mod:`alignx.data.loading`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any


class Skip(Exception):
    """A raw record that cannot be used; the message is the reason it is counted under."""


Parser = Callable[[dict[str, Any], int], dict[str, Any]]


# --------------------------------------------------------------------------------------------
# field helpers


def _text(rec: dict[str, Any], key: str, *, required: bool = True, allow_empty: bool = False) -> str:
    """A stripped string field; missing / wrong type / empty raise :class:`Skip` (unless allowed)."""
    if key not in rec or rec[key] is None:
        if required:
            raise Skip(f"missing field {key!r}")
        return ""
    value = rec[key]
    if not isinstance(value, str):
        raise Skip(f"wrong type for field {key!r}")
    value = value.strip()
    if not value and not allow_empty:
        raise Skip(f"empty field {key!r}")
    return value


def _bool(rec: dict[str, Any], key: str) -> bool:
    if key not in rec or rec[key] is None:
        raise Skip(f"missing field {key!r}")
    if not isinstance(rec[key], bool):
        raise Skip(f"wrong type for field {key!r}")
    return rec[key]


def _answers(value: Any, key: str) -> list[str]:
    """TruthfulQA answer lists: ';'-separated in the CSV, a list on the hub; empty pieces dropped."""
    if value is None:
        raise Skip(f"missing field {key!r}")
    if isinstance(value, str):
        pieces = value.split(";")
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        pieces = value
    else:
        raise Skip(f"wrong type for field {key!r}")
    answers = [p.strip() for p in pieces if p.strip()]
    if not answers:
        raise Skip(f"empty field {key!r}")
    return answers


# --------------------------------------------------------------------------------------------
# row parsers (raw record, position in file) -> normalised row


def instruction_row(rec: dict[str, Any], i: int) -> dict[str, Any]:
    """Alpaca-style {instruction, input, output}; a missing ``input`` means no input."""
    return {
        "index": i,
        "instruction": _text(rec, "instruction"),
        "input": _text(rec, "input", required=False, allow_empty=True),
        "output": _text(rec, "output"),
    }


def alpaca_eval(rec: dict[str, Any], i: int) -> dict[str, Any]:
    return {
        "index": i,
        "instruction": _text(rec, "instruction"),
        # two of the 805 text-davinci-003 references are empty; the instruction is what defines the set
        "output": _text(rec, "output", allow_empty=True),
        "dataset": _text(rec, "dataset", required=False, allow_empty=True),
        "generator": _text(rec, "generator", required=False, allow_empty=True),
    }


def alpaca_eval_annotation(rec: dict[str, Any], i: int) -> dict[str, Any]:
    """GPT-4 pairwise verdict: preference 1 = output_1 (the reference) better, 2 = output_2 better."""
    pref = rec.get("preference")
    if pref is None:
        raise Skip("missing field 'preference'")
    if isinstance(pref, bool) or not isinstance(pref, (int, float)) or not math.isfinite(pref):
        raise Skip("wrong type for field 'preference'")
    return {
        "index": i,
        "instruction": _text(rec, "instruction"),
        "output_1": _text(rec, "output_1"),
        "output_2": _text(rec, "output_2"),
        "generator_1": _text(rec, "generator_1", required=False, allow_empty=True),
        "generator_2": _text(rec, "generator_2", required=False, allow_empty=True),
        "preference": float(pref),
    }


def beavertails(rec: dict[str, Any], i: int) -> dict[str, Any]:
    category = rec.get("category", {})
    if category is None:
        category = {}
    if not isinstance(category, dict):
        raise Skip("wrong type for field 'category'")
    return {
        "index": i,
        "prompt": _text(rec, "prompt"),
        "response": _text(rec, "response"),
        "is_safe": _bool(rec, "is_safe"),
        "category": dict(category),
    }


def hh_rlhf(rec: dict[str, Any], i: int) -> dict[str, Any]:
    """Whole dialogues, kept unstripped ("\n\nHuman: ..." markers); splits.py reduces ``chosen`` to its last turn."""
    _text(rec, "chosen")
    _text(rec, "rejected")
    return {"index": i, "chosen": rec["chosen"], "rejected": rec["rejected"]}


# TruthfulQA's columns: the CSV's names, and the hub copy's (truthfulqa/truthful_qa, config "generation")
_TRUTHFULQA_CSV = ("Question", "Best Answer", "Correct Answers", "Incorrect Answers", "Type", "Category", "Source")
_TRUTHFULQA_HUB = ("question", "best_answer", "correct_answers", "incorrect_answers", "type", "category", "source")


def _truthfulqa_row(rec: dict[str, Any], i: int, columns: tuple[str, ...]) -> dict[str, Any]:
    question, best, correct, incorrect, kind, category, source = columns
    return {
        "index": i,
        "question": _text(rec, question),
        "best_answer": _text(rec, best),
        "correct_answers": _answers(rec.get(correct), correct),
        "incorrect_answers": _answers(rec.get(incorrect), incorrect),
        "type": _text(rec, kind, required=False, allow_empty=True),
        "category": _text(rec, category, required=False, allow_empty=True),
        "source": _text(rec, source, required=False, allow_empty=True),
    }


def truthfulqa(rec: dict[str, Any], i: int) -> dict[str, Any]:
    return _truthfulqa_row(rec, i, _TRUTHFULQA_CSV)


def truthfulqa_hub(rec: dict[str, Any], i: int) -> dict[str, Any]:
    return _truthfulqa_row(rec, i, _TRUTHFULQA_HUB)


def _mc_targets(value: Any, key: str) -> dict[str, int]:
    """{answer: 0/1}; the hub stores {"choices": [...], "labels": [...]} instead."""
    if value is None:
        raise Skip(f"missing field {key!r}")
    if isinstance(value, dict) and set(value) == {"choices", "labels"}:
        choices, labels = value["choices"], value["labels"]
        if not isinstance(choices, list) or not isinstance(labels, list) or len(choices) != len(labels):
            raise Skip(f"wrong type for field {key!r}")
        value = dict(zip(choices, labels))
    if not isinstance(value, dict) or not value:
        raise Skip(f"wrong type for field {key!r}" if not isinstance(value, dict) else f"empty field {key!r}")
    out: dict[str, int] = {}
    for answer, label in value.items():
        if not isinstance(answer, str) or isinstance(label, bool) or label not in (0, 1):
            raise Skip(f"wrong type for field {key!r}")
        out[answer] = int(label)
    return out


def truthfulqa_mc(rec: dict[str, Any], i: int) -> dict[str, Any]:
    return {
        "index": i,
        "question": _text(rec, "question"),
        "mc1_targets": _mc_targets(rec.get("mc1_targets"), "mc1_targets"),
        "mc2_targets": _mc_targets(rec.get("mc2_targets"), "mc2_targets"),
    }


def truthfulqa_finetune(suffix: str) -> Parser:
    """GPT-judge / GPT-info data: prompt "Q: ...\\nA: ...\\n<suffix>:" -> completion " yes" / " no"."""

    def parse(rec: dict[str, Any], i: int) -> dict[str, Any]:
        prompt = _text(rec, "prompt")
        completion = _text(rec, "completion")
        if completion not in ("yes", "no"):
            raise Skip("bad value for field 'completion'")
        tail = f"\n{suffix}:"
        if not prompt.startswith("Q:") or "\nA:" not in prompt or not prompt.endswith(tail):
            raise Skip("bad value for field 'prompt'")
        question, _, answer = prompt[: -len(tail)].partition("\nA:")
        question, answer = question[2:].strip(), answer.strip()
        if not question:
            raise Skip("bad value for field 'prompt'")
        # 67 rows label an empty answer; they are kept (answer ""), since a model can answer nothing
        return {"index": i, "question": question, "answer": answer, "label": completion == "yes", "prompt": prompt}

    return parse


def xstest(rec: dict[str, Any], i: int) -> dict[str, Any]:
    label = _text(rec, "label")
    if label not in ("safe", "unsafe"):
        raise Skip("bad value for field 'label'")
    raw_id = rec.get("id")
    if raw_id is None or (isinstance(raw_id, str) and not raw_id.strip()):
        raw_id = i + 1  # the hub copy has no id column; the CSV numbers rows from 1
    return {
        "index": i,
        "id": str(raw_id).strip(),
        "prompt": _text(rec, "prompt"),
        "type": _text(rec, "type"),
        "label": label,
        "focus": _text(rec, "focus", required=False, allow_empty=True),
        "note": _text(rec, "note", required=False, allow_empty=True),
    }


def leaderboard_row(rec: dict[str, Any], i: int) -> dict[str, Any]:
    """One system of an AlpacaEval leaderboard: its name (the CSV's unnamed first column) and win rate (%)."""
    try:
        win_rate = float(rec.get("win_rate", ""))
    except ValueError:
        raise Skip("wrong type for field 'win_rate'") from None
    if not math.isfinite(win_rate):
        raise Skip("wrong type for field 'win_rate'")
    try:  # hard verdicts, a draw counting half (AlpacaEval 2's weighted annotators report win_rate as a mean probability)
        discrete = float(rec.get("discrete_win_rate") or "nan")
    except ValueError:
        discrete = float("nan")
    return {"index": i, "model": _text(rec, ""), "win_rate": win_rate,
            "discrete_win_rate": discrete if math.isfinite(discrete) else None}


def xstest_completion(rec: dict[str, Any], i: int) -> dict[str, Any]:
    """Human-labelled completions: final_label 1_full_compliance / 2_full_refusal / 3_partial_refusal."""
    return {
        "index": i,
        "id": _text(rec, "id"),
        "type": _text(rec, "type"),
        "prompt": _text(rec, "prompt"),
        "completion": _text(rec, "completion", allow_empty=True),
        "final_label": _text(rec, "final_label"),
        "annotation_1": _text(rec, "annotation_1", required=False, allow_empty=True),
        "annotation_2": _text(rec, "annotation_2", required=False, allow_empty=True),
    }


def pku_saferlhf(rec: dict[str, Any], i: int) -> dict[str, Any]:
    label = _text(rec, "response_harmfulness")
    if label not in ("harmful", "unharmful"):
        raise Skip("bad value for field 'response_harmfulness'")
    return {
        "index": i,
        "prompt": _text(rec, "prompt"),
        "response": _text(rec, "response"),
        "is_harmful": label == "harmful",
    }


def stl_eval(rec: dict[str, Any], i: int) -> dict[str, Any]:
    """One row of a dict-of-lists evaluation file: {"instructions": [...], "inputs": [...], "tags": [...]}."""
    return {
        "index": i,
        "instruction": _text(rec, "instruction"),
        "input": _text(rec, "input", required=False, allow_empty=True),
        "tag": _text(rec, "tag", required=False, allow_empty=True),
    }
