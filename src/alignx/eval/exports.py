"""Each method's answers in the formats the official evaluation tools read, written by ``alignx eval``.

* AlpacaEval: ``<suite>/exports/alpaca_eval/<method>.json``, AlpacaEval's ``model_outputs.json`` format (a list of
  ``{"instruction", "output", "generator", "dataset"}``), so a user with API access runs the official judge on
  exactly what AlignX generated::

      alpaca_eval --model_outputs runs/demo/eval/quick/exports/alpaca_eval/alignx.json

* TruthfulQA: ``<suite>/exports/truthfulqa/answers.csv``, the layout of TruthfulQA's own ``TruthfulQA.csv``
  (Type, Category, Question, Best Answer, Correct Answers, Incorrect Answers, Source; answers joined by "; ")
  with one column of answers per method, named by the method, as its ``evaluate.py --models`` reads them.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from alignx.run import atomic_write_json, atomic_write_text

TRUTHFULQA_COLUMNS = ("Type", "Category", "Question", "Best Answer", "Correct Answers", "Incorrect Answers", "Source")


def alpaca_eval_outputs(items: list[dict], answers: dict[str, str], method: str) -> list[dict]:
    """AlpacaEval model outputs of one method (``answers``: item id -> response), in item order."""
    return [{"instruction": item["prompt"], "output": answers[item["id"]], "generator": f"alignx-{method}",
             "dataset": item.get("dataset", "")} for item in items if item["id"] in answers]


def truthfulqa_csv(items: list[dict], answers: dict[str, dict[str, str]]) -> str:
    """The questions in TruthfulQA.csv's columns plus one column per method (``answers``: method -> id -> answer)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([*TRUTHFULQA_COLUMNS, *answers])
    for item in items:
        writer.writerow([item.get("type", ""), item.get("category", ""), item["prompt"], item["best_answer"],
                         "; ".join(item["correct_answers"]), "; ".join(item["incorrect_answers"]), item.get("source", ""),
                         *(by_id.get(item["id"], "") for by_id in answers.values())])
    return buffer.getvalue()


def write_exports(root: Path, items: dict[str, list[dict]], responses: dict[str, dict[str, dict[str, str]]]) -> None:
    """``responses``: benchmark -> method -> item id -> response (of the methods that answered it)."""
    for method, answers in responses.get("alpacaeval", {}).items():
        atomic_write_json(root / "exports" / "alpaca_eval" / f"{method}.json", alpaca_eval_outputs(items["alpacaeval"], answers, method))
    if responses.get("truthfulqa"):
        atomic_write_text(root / "exports" / "truthfulqa" / "answers.csv", truthfulqa_csv(items["truthfulqa"], responses["truthfulqa"]))
