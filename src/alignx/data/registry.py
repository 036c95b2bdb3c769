"""Where every source data set lives and how its raw rows are parsed into normalised dicts.

Each :class:`Source` names

- its file(s) relative to the data directory, laid out exactly like ``shared/data`` (the directory
  comes from ``data.data_dir`` or ``$ALIGNX_DATA_DIR``);
- how to get the same rows online: a Hugging Face hub data set (``hub``) and/or a raw file URL
  pinned to the upstream commit the local copy was taken from (``url``; parsed by the very same
  reader as the local file, so the rows are identical). Sources with neither are local-only;
- a row parser that turns one raw record into a dict with normalised field names, or rejects it
  with a reason.

:func:`load_source` never crashes on a bad row: rows with missing fields, empty text (after strip),
wrong types, or unparseable JSON lines are skipped and counted by reason in ``LoadResult.skipped``.
A missing or unreadable file is an :class:`~alignx.errors.AlignXError` naming the file and the
setting that points to it. Every normalised row carries ``index``: its 0-based position in the
source file (counting rejected rows too), so positional splits such as "TruthfulQA questions 1-408"
do not shift when a row is rejected. Text fields are stripped.

Online choices (documented here because the hub copies differ from the local ones):

- ``tatsu-lab/alpaca_eval`` is a loading-script data set that ``datasets>=4`` cannot run, so the
  pinned GitHub file of the AlpacaEval repo is the fallback (``url``).
- TruthfulQA on the hub (``truthfulqa/truthful_qa``, config ``generation``) names its columns
  ``question, best_answer, correct_answers (list), incorrect_answers (list), type, category,
  source``; :func:`_truthfulqa_hub` maps them to the same normalised fields as the CSV.
- XSTest: ``walledai/XSTest`` (split ``test``; columns prompt, focus, type, note, label; the
  450 prompts of xstest_prompts.csv). It was chosen over ``natolambert/xstest-v2-copy`` because it
  holds exactly the prompt file, with the same ``label`` column; rows without an ``id`` get
  ``position + 1``, which is the CSV's numbering.
"""

from __future__ import annotations

import csv
import functools
import gzip
import io
import json
import math
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignx.errors import AlignXError

SETTING = "data.data_dir / $ALIGNX_DATA_DIR"


class Skip(Exception):
    """A raw record that cannot be used; the message is the reason it is counted under."""


@dataclass(frozen=True)
class HubSpec:
    """Arguments for ``datasets.load_dataset(path, name, data_dir=..., split=...)``."""

    path: str
    name: str | None = None
    split: str = "train"
    data_dir: str | None = None

    def describe(self) -> str:
        extra = "".join(f" {k}={v}" for k, v in (("config", self.name), ("data_dir", self.data_dir)) if v)
        return f"{self.path}{extra} split={self.split}"


Parser = Callable[[dict[str, Any], int], dict[str, Any]]


@dataclass(frozen=True)
class Source:
    """One source data set: local file, online location(s), file format and row parser."""

    name: str
    path: str  # relative to the data directory (layout of shared/data)
    fmt: str  # jsonl | jsonl.gz | json_list | json_columns | csv
    parse: Parser
    hub: HubSpec | None = None
    hub_parse: Parser | None = None  # parser for hub rows when their columns differ from the file's
    url: str | None = None  # the same file online, pinned to the commit the local copy came from
    description: str = ""
    columns_key: str = field(default="instructions")  # json_columns: the list that defines the rows


@dataclass
class LoadResult:
    """Parsed rows of one source (treat the dicts as read-only: they are cached) and skip counts."""

    rows: list[dict[str, Any]]
    skipped: Counter[str]
    origin: str = ""  # the file, hub id or URL the rows came from


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


def _instruction_row(rec: dict[str, Any], i: int) -> dict[str, Any]:
    """Alpaca-style {instruction, input, output}; a missing ``input`` means no input."""
    return {
        "index": i,
        "instruction": _text(rec, "instruction"),
        "input": _text(rec, "input", required=False, allow_empty=True),
        "output": _text(rec, "output"),
    }


def _alpaca_eval(rec: dict[str, Any], i: int) -> dict[str, Any]:
    return {
        "index": i,
        "instruction": _text(rec, "instruction"),
        # two of the 805 text-davinci-003 references are empty; the instruction is what defines the set
        "output": _text(rec, "output", allow_empty=True),
        "dataset": _text(rec, "dataset", required=False, allow_empty=True),
        "generator": _text(rec, "generator", required=False, allow_empty=True),
    }


def _alpaca_eval_annotation(rec: dict[str, Any], i: int) -> dict[str, Any]:
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


def _beavertails(rec: dict[str, Any], i: int) -> dict[str, Any]:
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


def _hh_rlhf(rec: dict[str, Any], i: int) -> dict[str, Any]:
    """Whole dialogues, kept unstripped ("\n\nHuman: ..." markers); splits.py reduces ``chosen`` to its last turn."""
    _text(rec, "chosen")
    _text(rec, "rejected")
    return {"index": i, "chosen": rec["chosen"], "rejected": rec["rejected"]}


def _truthfulqa(rec: dict[str, Any], i: int) -> dict[str, Any]:
    return {
        "index": i,
        "question": _text(rec, "Question"),
        "best_answer": _text(rec, "Best Answer"),
        "correct_answers": _answers(rec.get("Correct Answers"), "Correct Answers"),
        "incorrect_answers": _answers(rec.get("Incorrect Answers"), "Incorrect Answers"),
        "type": _text(rec, "Type", required=False, allow_empty=True),
        "category": _text(rec, "Category", required=False, allow_empty=True),
        "source": _text(rec, "Source", required=False, allow_empty=True),
    }


def _truthfulqa_hub(rec: dict[str, Any], i: int) -> dict[str, Any]:
    return {
        "index": i,
        "question": _text(rec, "question"),
        "best_answer": _text(rec, "best_answer"),
        "correct_answers": _answers(rec.get("correct_answers"), "correct_answers"),
        "incorrect_answers": _answers(rec.get("incorrect_answers"), "incorrect_answers"),
        "type": _text(rec, "type", required=False, allow_empty=True),
        "category": _text(rec, "category", required=False, allow_empty=True),
        "source": _text(rec, "source", required=False, allow_empty=True),
    }


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


def _truthfulqa_mc(rec: dict[str, Any], i: int) -> dict[str, Any]:
    return {
        "index": i,
        "question": _text(rec, "question"),
        "mc1_targets": _mc_targets(rec.get("mc1_targets"), "mc1_targets"),
        "mc2_targets": _mc_targets(rec.get("mc2_targets"), "mc2_targets"),
    }


def _truthfulqa_finetune(suffix: str) -> Parser:
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


def _xstest(rec: dict[str, Any], i: int) -> dict[str, Any]:
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


def _leaderboard_row(rec: dict[str, Any], i: int) -> dict[str, Any]:
    """One system of an AlpacaEval leaderboard: its name (the CSV's unnamed first column) and win rate (%)."""
    try:
        win_rate = float(rec.get("win_rate", ""))
    except ValueError:
        raise Skip("wrong type for field 'win_rate'") from None
    if not math.isfinite(win_rate):
        raise Skip("wrong type for field 'win_rate'")
    return {"index": i, "model": _text(rec, ""), "win_rate": win_rate}


def _xstest_completion(rec: dict[str, Any], i: int) -> dict[str, Any]:
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


def _pku_saferlhf(rec: dict[str, Any], i: int) -> dict[str, Any]:
    label = _text(rec, "response_harmfulness")
    if label not in ("harmful", "unharmful"):
        raise Skip("bad value for field 'response_harmfulness'")
    return {
        "index": i,
        "prompt": _text(rec, "prompt"),
        "response": _text(rec, "response"),
        "is_harmful": label == "harmful",
    }


def _stl_eval(rec: dict[str, Any], i: int) -> dict[str, Any]:
    """One row of a dict-of-lists evaluation file: {"instructions": [...], "inputs": [...], "tags": [...]}."""
    return {
        "index": i,
        "instruction": _text(rec, "instruction"),
        "input": _text(rec, "input", required=False, allow_empty=True),
        "tag": _text(rec, "tag", required=False, allow_empty=True),
    }


# --------------------------------------------------------------------------------------------
# the registry

_STL_COMMIT = "https://raw.githubusercontent.com/vinid/safety-tuned-llamas/36a4b8d5c2177ed165bf61f59b590161394f7f12"
_TQA_COMMIT = "https://raw.githubusercontent.com/sylinrl/TruthfulQA/d71c110897f5d31c5d7f309e7bc316c152f6f031"
_XST_COMMIT = "https://raw.githubusercontent.com/paul-rottger/exaggerated-safety/d7bb5bd738c1fcbc36edd83d5e7d1b71a3e2d84d"
_AE_COMMIT = "https://raw.githubusercontent.com/tatsu-lab/alpaca_eval/cd543a149df89434d8a54582c0151c0b945c3d20"

# The safety-tuned-llamas evaluation sets (dict-of-lists files).
STL_EVAL_SETS: tuple[str, ...] = (
    "I-Alpaca",
    "I-CoNa",
    "I-Controversial",
    "I-MaliciousInstructions",
    "I-PhysicalSafetySafe",
    "I-PhysicalSafetyUnsafe",
    "Q-Harm",
)
XSTEST_COMPLETION_MODELS: tuple[str, ...] = ("gpt4", "llama2new", "llama2orig", "mistralguard", "mistralinstruct")
ALPACA_EVAL_ANNOTATIONS: tuple[tuple[str, str], ...] = (
    ("alpaca_eval_gpt4", "alpaca-7b"),
    ("alpaca_eval_gpt4", "llama-2-7b-chat-hf"),
    ("alpaca_eval_gpt4", "zephyr-7b-beta"),
    ("weighted_alpaca_eval_gpt4_turbo", "alpaca-7b"),
    ("weighted_alpaca_eval_gpt4_turbo", "text_davinci_003"),
)


def _build_registry() -> dict[str, Source]:
    sources = [
        Source(
            "alpaca",
            "alpaca/alpaca_data.jsonl",
            "jsonl",
            _instruction_row,
            hub=HubSpec("tatsu-lab/alpaca", split="train"),
            description="Stanford Alpaca, 52,002 instructions (helpful training)",
        ),
        Source(
            "alpaca_eval",
            "alpaca_eval/reference_outputs/text_davinci_003_model_outputs.json",
            "json_list",
            _alpaca_eval,
            hub=HubSpec("tatsu-lab/alpaca_eval", name="alpaca_eval", split="eval"),
            url=f"{_AE_COMMIT}/results/text_davinci_003/model_outputs.json",
            description="AlpacaEval 805 instructions + text-davinci-003 references (helpful evaluation)",
        ),
        Source(
            "beavertails",
            "beavertails/30k_test.jsonl",
            "jsonl",
            _beavertails,
            hub=HubSpec("PKU-Alignment/BeaverTails", split="30k_test"),
            description="BeaverTails 30k_test, 3,021 labelled QA pairs (harmless dev/eval halves)",
        ),
        Source(
            "hh_rlhf_harmless",
            "hh-rlhf/harmless-base/test.jsonl.gz",
            "jsonl.gz",
            _hh_rlhf,
            hub=HubSpec("Anthropic/hh-rlhf", data_dir="harmless-base", split="test"),
            description="Anthropic HH-RLHF harmless-base test, 2,312 chosen/rejected dialogues",
        ),
        Source(
            "safety_tuned_llamas",
            "safety_tuned_llamas/training/safety_only_data_Instructions.json",
            "json_list",
            _instruction_row,
            url=f"{_STL_COMMIT}/data/training/safety_only_data_Instructions.json",
            description="Safety-tuned LLaMAs, 2,483 safety demonstrations (harmless training)",
        ),
        Source(
            "truthfulqa",
            "truthfulqa/TruthfulQA.csv",
            "csv",
            _truthfulqa,
            hub=HubSpec("truthfulqa/truthful_qa", name="generation", split="validation"),
            hub_parse=_truthfulqa_hub,
            description="TruthfulQA, 817 questions with best/correct/incorrect answers",
        ),
        Source(
            "truthfulqa_mc",
            "truthfulqa/mc_task.json",
            "json_list",
            _truthfulqa_mc,
            hub=HubSpec("truthfulqa/truthful_qa", name="multiple_choice", split="validation"),
            description="TruthfulQA MC1/MC2 targets (answer -> 1/0)",
        ),
        Source(
            "truthfulqa_finetune_truth",
            "truthfulqa/finetune_truth.jsonl",
            "jsonl",
            _truthfulqa_finetune("True"),
            url=f"{_TQA_COMMIT}/data/finetune_truth.jsonl",
            description="TruthfulQA GPT-judge data: human truthfulness labels",
        ),
        Source(
            "truthfulqa_finetune_info",
            "truthfulqa/finetune_info.jsonl",
            "jsonl",
            _truthfulqa_finetune("Helpful"),
            url=f"{_TQA_COMMIT}/data/finetune_info.jsonl",
            description="TruthfulQA GPT-info data: human informativeness labels",
        ),
        Source(
            "xstest",
            "xstest/xstest_prompts.csv",
            "csv",
            _xstest,
            hub=HubSpec("walledai/XSTest", split="test"),
            url=f"{_XST_COMMIT}/xstest_prompts.csv",
            description="XSTest 450 prompts: 250 safe, 200 unsafe contrast prompts (over-refusal)",
        ),
        Source(
            "pku_saferlhf",
            "pku_saferlhf/guardreasoner_saferlhf_test_2k.jsonl",
            "jsonl",
            _pku_saferlhf,
            description="PKU-SafeRLHF 2k response-harmfulness pairs (judge validation; local only)",
        ),
    ]
    for set_name in STL_EVAL_SETS:
        sources.append(
            Source(
                f"stl_eval:{set_name}",
                f"safety_tuned_llamas/evaluation/{set_name}.json",
                "json_columns",
                _stl_eval,
                url=f"{_STL_COMMIT}/data/evaluation/{set_name}.json",
                description=f"Safety-tuned LLaMAs evaluation set {set_name}",
            )
        )
    for model in XSTEST_COMPLETION_MODELS:
        sources.append(
            Source(
                f"xstest_completions:{model}",
                f"xstest/model_completions/xstest_v2_completions_{model}.csv",
                "csv",
                _xstest_completion,
                url=f"{_XST_COMMIT}/model_completions/xstest_v2_completions_{model}.csv",
                description=f"XSTest completions of {model} with human compliance/refusal labels",
            )
        )
    for annotator, model in ALPACA_EVAL_ANNOTATIONS:
        sources.append(
            Source(
                f"alpaca_eval_annotations:{annotator}:{model}",
                f"alpaca_eval/annotations/{annotator}/{model}.json",
                "json_list",
                _alpaca_eval_annotation,
                url=f"{_AE_COMMIT}/results/{model}/{annotator}/annotations.json",
                description=f"AlpacaEval {annotator} pairwise verdicts for {model}",
            )
        )
    sources.append(
        Source(
            "alpaca_eval_leaderboard:alpaca_eval_gpt4",
            "alpaca_eval/leaderboards/data_AlpacaEval/alpaca_eval_gpt4_leaderboard.csv",
            "csv",
            _leaderboard_row,
            url=f"{_AE_COMMIT}/src/alpaca_eval/leaderboards/data_AlpacaEval/alpaca_eval_gpt4_leaderboard.csv",
            description="AlpacaEval 1 leaderboard: GPT-4's win rate of each system against text-davinci-003",
        )
    )
    return {s.name: s for s in sources}


SOURCES: dict[str, Source] = _build_registry()


def source_names() -> list[str]:
    return list(SOURCES)


def get_source(name: str) -> Source:
    try:
        return SOURCES[name]
    except KeyError:
        raise AlignXError(f"unknown data source {name!r}; valid sources: {', '.join(SOURCES)}") from None


# --------------------------------------------------------------------------------------------
# readers: bytes of a whole file -> (position, record | Skip)

Record = tuple[int, "dict[str, Any] | Skip"]


def _records(data: bytes, source: Source, where: str) -> Iterator[Record]:
    """Raw records of one file. File-level problems raise AlignXError; row-level ones yield Skip."""
    fmt = source.fmt
    try:
        if fmt == "jsonl.gz":
            data = gzip.decompress(data)
        text = data.decode("utf-8-sig")  # tolerates (and drops) a byte-order mark
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise AlignXError(f"{source.name}: cannot read {where}: {exc} (set by {SETTING})") from None

    if fmt in ("jsonl", "jsonl.gz"):
        position = 0
        for line in text.splitlines():
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                yield position, Skip("unparseable JSON line")
            else:
                yield position, rec if isinstance(rec, dict) else Skip("row is not a JSON object")
            position += 1
        return

    if fmt == "csv":
        try:
            reader = csv.DictReader(io.StringIO(text, newline=""))
            rows = list(reader)
        except csv.Error as exc:
            raise AlignXError(f"{source.name}: cannot parse CSV {where}: {exc} (set by {SETTING})") from None
        for position, row in enumerate(rows):
            row.pop(None, None)  # surplus cells of a row longer than the header
            yield position, row
        return

    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise AlignXError(f"{source.name}: {where} is not valid JSON: {exc} (set by {SETTING})") from None
    if fmt == "json_list":
        if not isinstance(doc, list):
            raise AlignXError(f"{source.name}: {where} must hold a JSON list of rows, got {type(doc).__name__}")
        for position, rec in enumerate(doc):
            yield position, rec if isinstance(rec, dict) else Skip("row is not a JSON object")
        return
    if fmt == "json_columns":
        key = source.columns_key
        if not isinstance(doc, dict) or not isinstance(doc.get(key), list):
            raise AlignXError(f"{source.name}: {where} must hold a JSON object with a list {key!r}")
        column = doc[key]
        others = {k: v for k, v in doc.items() if k != key and isinstance(v, list) and len(v) == len(column)}
        singular = {k: k[:-1] if k.endswith("s") else k for k in [key, *others]}
        for position, value in enumerate(column):
            rec = {singular[key]: value}
            rec.update({singular[k]: v[position] for k, v in others.items()})
            yield position, rec
        return
    raise ValueError(f"unknown file format {fmt!r} for source {source.name}")  # our bug, not the user's


def _parse_all(records: Iterator[Record], parse: Parser) -> tuple[list[dict[str, Any]], Counter[str]]:
    rows: list[dict[str, Any]] = []
    skipped: Counter[str] = Counter()
    for position, rec in records:
        if isinstance(rec, Skip):
            skipped[str(rec)] += 1
            continue
        try:
            rows.append(parse(rec, position))
        except Skip as reason:
            skipped[str(reason)] += 1
    return rows, skipped


# --------------------------------------------------------------------------------------------
# loading


def _file_stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


def load_source(name: str, data_dir: Path | str | None) -> LoadResult:
    """Load and parse one source from ``data_dir`` (layout of shared/data), or online when None.

    Results are cached per process, keyed on (name, data_dir) and the file's mtime/size, so the
    20 MB Alpaca file is parsed once. The returned list is a fresh copy; its dicts are shared.
    """
    source = get_source(name)
    stamp = None
    if data_dir is not None:
        stamp = _file_stamp(Path(data_dir).expanduser() / source.path)
    cached = _load_cached(name, None if data_dir is None else str(data_dir), stamp)
    return LoadResult(rows=list(cached.rows), skipped=Counter(cached.skipped), origin=cached.origin)


def clear_cache() -> None:
    _load_cached.cache_clear()


@functools.lru_cache(maxsize=64)
def _load_cached(name: str, data_dir: str | None, stamp: tuple[int, int] | None) -> LoadResult:
    source = SOURCES[name]
    if data_dir is None:
        return _load_online(source)
    return _load_local(source, Path(data_dir).expanduser())


def _load_local(source: Source, data_dir: Path) -> LoadResult:
    if not data_dir.is_dir():
        raise AlignXError(
            f"data directory {data_dir} does not exist (set by {SETTING}); point it at a copy laid out like "
            f"shared/data, or unset both to read from the Hugging Face hub"
        )
    path = data_dir / source.path
    if not path.is_file():
        raise AlignXError(
            f"{source.name}: file not found: {path} (expected {source.path} under the data directory "
            f"{data_dir}, set by {SETTING})"
        )
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise AlignXError(f"{source.name}: cannot read {path}: {exc} (set by {SETTING})") from None
    rows, skipped = _parse_all(_records(data, source, str(path)), source.parse)
    return LoadResult(rows, skipped, origin=str(path))


def _load_online(source: Source) -> LoadResult:
    if source.hub is None and source.url is None:
        raise AlignXError(
            f"{source.name} is only available from a local copy: set {SETTING} to a directory laid out like "
            f"shared/data (expected file {source.path})"
        )
    errors: list[str] = []
    if source.hub is not None:
        try:
            return _load_hub(source, source.hub)
        except Exception as exc:  # offline, gated, renamed...: fall through to the URL or the error below
            errors.append(f"hub {source.hub.describe()}: {type(exc).__name__}: {exc}")
    if source.url is not None:
        try:
            return _load_url(source, source.url)
        except AlignXError:
            raise
        except Exception as exc:
            errors.append(f"{source.url}: {type(exc).__name__}: {exc}")
    raise AlignXError(
        f"{source.name}: no data directory is set and loading it online failed ({'; '.join(errors)}). "
        f"Set {SETTING} to a local copy laid out like shared/data (expected file {source.path}), or go online."
    )


def _load_hub(source: Source, hub: HubSpec) -> LoadResult:
    import datasets  # lazy: heavy import, only needed online

    kwargs: dict[str, Any] = {"split": hub.split}
    if hub.data_dir:
        kwargs["data_dir"] = hub.data_dir
    ds = datasets.load_dataset(hub.path, hub.name, **kwargs) if hub.name else datasets.load_dataset(hub.path, **kwargs)
    parse = source.hub_parse or source.parse
    records = ((i, dict(rec) if isinstance(rec, dict) else Skip("row is not a JSON object")) for i, rec in enumerate(ds))
    rows, skipped = _parse_all(records, parse)
    return LoadResult(rows, skipped, origin=f"hub:{hub.describe()}")


def _load_url(source: Source, url: str) -> LoadResult:
    import urllib.request

    timeout = float(os.environ.get("ALIGNX_DOWNLOAD_TIMEOUT", "60"))
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - fixed https URLs
        data = response.read()
    rows, skipped = _parse_all(_records(data, source, url), source.parse)
    return LoadResult(rows, skipped, origin=url)
