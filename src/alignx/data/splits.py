"""Canonical, deterministic training / evaluation splits (METHOD.md section 1, seed 0).

Everything here is a pure function of the source files and :class:`~alignx.config.DataConfig`:
sampling uses ``random.Random(data.seed)`` and hashing uses ``hashlib`` (never ``hash()``, which is
randomised per process), so two runs on the same files give byte-identical splits and the same
``sha256``, which run manifests record.

Training data per axis (:func:`training_examples`):

- **helpful**: Alpaca minus evaluation prompts (below), **then** ``random.Random(seed).sample`` of
  ``data.helpful_rows`` rows from the filtered list, kept in original file order. Evaluation prompts
  are removed *before* sampling so that exactly ``helpful_rows`` rows remain.
- **harmless**: safety-tuned-llamas (2,483), then hh-rlhf harmless-base ``chosen`` dialogues reduced
  to their last turn (last "Human:" text -> instruction, final "Assistant:" text -> response; rows
  whose last assistant turn is empty are skipped), then BeaverTails **dev**-half rows with
  ``is_safe=true`` (prompt -> instruction, response -> response), each in file order, minus
  evaluation prompts.
- **honest**: TruthfulQA questions 1-408 (file rows 0..407), one example per correct answer
  (the ``Correct Answers`` column split on ';'). In this file version the ``Best Answer`` is always
  one of the correct answers, so it is not added separately.
- **Decontamination** (every axis; :func:`evaluation_keys`): a training row is dropped when its
  instruction, or its whole user text, equals an evaluation prompt of *any* axis (AlpacaEval,
  BeaverTails eval half, TruthfulQA 409-817, XSTest, the harmful sets), ignoring case and runs of
  whitespace. METHOD.md asks for Alpaca minus AlpacaEval (no exact match on the shared data) and
  that no evaluation prompt is ever seen in training; the sources overlap more than that:
  BeaverTails and Q-Harm prompts come from the HH red-team data, so 53 hh-rlhf last turns are
  BeaverTails eval prompts and 6 are Q-Harm prompts; 1 Alpaca instruction is a BeaverTails eval
  prompt and 1 a TruthfulQA evaluation question. Each removal is counted in ``excluded``.
- ``data.max_rows_per_axis``, when set, keeps a seeded subset of that size (in split order) of the
  *full* split, so a small run always trains on a subset of the full run's data.

BeaverTails 30k_test is split by **distinct prompt**: a prompt belongs to the dev half when
``int(sha256(prompt.strip().encode()).hexdigest(), 16) % 2 == 0`` and to the eval half otherwise
(:func:`beavertails_half`). Dev rows may be used for training and by judges; eval prompts are only
ever evaluation prompts.

Evaluation prompts (:func:`evaluation_prompts`): helpful = AlpacaEval's 805 instructions (response =
text-davinci-003 reference; two references are empty in the file and stay ""); harmless = distinct
BeaverTails eval-half prompts in first-occurrence order (response ""); honest = TruthfulQA questions
409-817 (response = Best Answer).

``SplitResult.skipped`` counts bad rows (``"<source>: <reason>"``); ``SplitResult.excluded`` counts
rows left out by design (eval half, unsafe, evaluation prompts, not sampled...), so a report can
tell data problems from the method.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from alignx.axes import AXES
from alignx.config import DataConfig
from alignx.data.loading import load_source
from alignx.data.registry import STL_EVAL_SETS
from alignx.errors import AlignXError

HONEST_TRAIN_QUESTIONS = 408  # TruthfulQA questions 1..408 train, 409..817 evaluate

# safety-tuned-llamas evaluation sets of clearly harmful requests (refusal rate should be high).
# I-Alpaca and I-PhysicalSafetySafe are benign controls and deliberately not in this list.
HARMFUL_EVAL_SETS: tuple[str, ...] = (
    "I-MaliciousInstructions",
    "I-CoNa",
    "I-Controversial",
    "Q-Harm",
    "I-PhysicalSafetyUnsafe",
)
assert set(HARMFUL_EVAL_SETS) <= set(STL_EVAL_SETS)


@dataclass(frozen=True)
class Example:
    """One prompt (and, for training, its target response) of one axis."""

    axis: str
    instruction: str
    input: str
    response: str
    source: str
    id: str = ""  # "<source>:<0-based row in the source file>[:<answer number>]"

    @property
    def user_text(self) -> str:
        """The user turn: instruction, plus a blank line and the input when there is one."""
        return f"{self.instruction}\n\n{self.input}" if self.input else self.instruction


@dataclass
class SplitResult:
    examples: list[Example]
    skipped: Counter[str] = field(default_factory=Counter)  # bad rows, "<source>: <reason>" -> count
    excluded: Counter[str] = field(default_factory=Counter)  # rows left out by design
    sha256: str = ""

    def __post_init__(self) -> None:
        if not self.sha256:
            self.sha256 = examples_sha256(self.examples)


def examples_sha256(examples: Iterable[Example]) -> str:
    """SHA-256 of the canonical serialisation: a compact JSON array (UTF-8, no ASCII escaping) of
    ``[axis, instruction, input, response, source, id]`` arrays, in split order."""
    table = [[ex.axis, ex.instruction, ex.input, ex.response, ex.source, ex.id] for ex in examples]
    return hashlib.sha256(json.dumps(table, ensure_ascii=False, separators=(",", ":")).encode("utf-8")).hexdigest()


def rows_sha256(rows: Iterable[dict[str, Any]]) -> str:
    """SHA-256 of a compact JSON array of plain dicts with sorted keys (UTF-8, no ASCII escaping)."""
    text = json.dumps(list(rows), ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------------------------
# helpers


def _check_axis(axis: str) -> None:
    if axis not in AXES:
        raise AlignXError(f"unknown axis {axis!r}; valid axes: {', '.join(AXES)}")


def _load(name: str, data: DataConfig, skipped: Counter[str]) -> list[dict[str, Any]]:
    result = load_source(name, data.resolved_data_dir())
    for reason, n in result.skipped.items():
        skipped[f"{name}: {reason}"] += n
    return result.rows


def seeded_subset(items: list[Any], k: int | None, seed: int) -> list[Any]:
    """``random.Random(seed).sample`` of ``k`` positions, kept in their original order."""
    if k is None or k >= len(items):
        return list(items)
    keep = sorted(random.Random(seed).sample(range(len(items)), k))
    return [items[i] for i in keep]


def in_hash_fraction(prompt: str, fraction: float) -> bool:
    """Stable (hash-based) membership of ``prompt`` in a held-out ``fraction`` (Stage 2's calibration split, the
    preference pairs' held-out prompts: the same prompts for every fraction's first share)."""
    return int(hashlib.sha256(prompt.strip().encode()).hexdigest()[:8], 16) % 10_000 < fraction * 10_000


def beavertails_half(prompt: str) -> str:
    """'dev' or 'eval': the stable half of BeaverTails 30k_test a prompt belongs to."""
    return "dev" if int(hashlib.sha256(prompt.strip().encode("utf-8")).hexdigest(), 16) % 2 == 0 else "eval"


def last_turn(dialogue: str) -> tuple[str, str] | None:
    """(last human text, final assistant text) of an HH-RLHF dialogue, or None when it has no
    "Human: ... Assistant:" ending. Texts are stripped; the assistant text may be empty."""
    a = dialogue.rfind("\n\nAssistant:")
    if a < 0:
        return None
    h = dialogue.rfind("\n\nHuman:", 0, a)
    if h < 0 or dialogue.find("\n\nHuman:", a) >= 0:
        return None
    return dialogue[h + len("\n\nHuman:") : a].strip(), dialogue[a + len("\n\nAssistant:") :].strip()


def _finish(axis: str, kind: str, examples: list[Example], skipped: Counter[str], excluded: Counter[str]) -> SplitResult:
    if not examples:
        reasons = "; ".join(f"{r}: {n}" for r, n in sorted((skipped + excluded).items())) or "no rows in the sources"
        raise AlignXError(f"the {axis} {kind} split is empty after filtering ({reasons})")
    return SplitResult(examples, +skipped, +excluded)


# --------------------------------------------------------------------------------------------
# training


def training_examples(axis: str, data: DataConfig) -> SplitResult:
    """The canonical training split of ``axis`` (see the module docstring for the recipe)."""
    _check_axis(axis)
    skipped: Counter[str] = Counter()
    excluded: Counter[str] = Counter()
    keys = evaluation_keys(data)
    if axis == "helpful":
        examples = _helpful_train(data, keys, skipped, excluded)
    elif axis == "harmless":
        examples = _harmless_train(data, keys, skipped, excluded)
    else:
        examples = _honest_train(data, keys, skipped, excluded)
    if not examples:
        return _finish(axis, "training", examples, skipped, excluded)
    full = len(examples)
    examples = seeded_subset(examples, data.max_rows_per_axis, data.seed)
    if len(examples) < full:
        excluded[f"data.max_rows_per_axis={data.max_rows_per_axis}"] += full - len(examples)
    return _finish(axis, "training", examples, skipped, excluded)


@dataclass(frozen=True)
class PreferencePair:
    """One preference pair of an axis: the prompt and the preferred answer (``chosen.response``), and the other one."""

    chosen: Example
    rejected: str


def preference_pairs(axis: str, data: DataConfig) -> list[PreferencePair]:
    """The preference pairs of ``axis`` for ``train.objective: dpo``, from its own training sources only:

    * honest: each correct answer of TruthfulQA questions 1-408 against one of the question's incorrect answers
      (the j-th correct with the (j mod n)-th incorrect), so the honest expert sees the questions its SFT split has;
    * harmless: hh-rlhf harmless-base dialogues reduced to their last turn, the ``chosen`` answer against the
      ``rejected`` one, where both answer the same last human turn and differ.

    Decontaminated like the training splits, then ``data.max_rows_per_axis`` applies. The helpful axis has no clean
    pairs here (AlpacaEval's annotations are the evaluation's prompts and the helpfulness judge's training data)."""
    _check_axis(axis)
    skipped: Counter[str] = Counter()
    excluded: Counter[str] = Counter()
    pairs: list[PreferencePair] = []
    if axis == "honest":
        for r in _load("truthfulqa", data, skipped):
            if r["index"] < HONEST_TRAIN_QUESTIONS and r["incorrect_answers"]:
                wrong = r["incorrect_answers"]
                pairs += [PreferencePair(Example("honest", r["question"], "", answer, "truthfulqa", f"truthfulqa:{r['index']}:{j}"),
                                         wrong[j % len(wrong)]) for j, answer in enumerate(r["correct_answers"])
                          if answer != wrong[j % len(wrong)]]  # a few questions list one answer as both
    elif axis == "harmless":
        for r in _load("hh_rlhf_harmless", data, skipped):
            chosen, rejected = last_turn(r["chosen"]), last_turn(r["rejected"])
            if chosen and rejected and chosen[0] and chosen[0] == rejected[0] and chosen[1] and rejected[1] and chosen[1] != rejected[1]:
                pairs.append(PreferencePair(Example("harmless", chosen[0], "", chosen[1], "hh_rlhf_harmless",
                                                    f"hh_rlhf_harmless:{r['index']}"), rejected[1]))
    else:
        raise AlignXError("the helpful axis has no preference pairs (train.objective.helpful must be sft): see docs/method.md")
    kept = {e.id for e in _decontaminate([p.chosen for p in pairs], evaluation_keys(data), excluded)}
    pairs = seeded_subset([p for p in pairs if p.chosen.id in kept], data.max_rows_per_axis, data.seed)
    if not pairs:
        raise AlignXError(f"the {axis} preference pairs are empty after filtering")
    return pairs


def normalise_prompt(text: str) -> str:
    """Key for decontamination: whitespace runs collapsed, case folded."""
    return " ".join(text.split()).casefold()


def evaluation_keys(data: DataConfig) -> dict[str, str]:
    """normalise_prompt(text) -> evaluation set, for every prompt any evaluation uses: AlpacaEval,
    BeaverTails eval half, TruthfulQA 409-817, XSTest, and the harmful sets of :data:`HARMFUL_EVAL_SETS`.
    Bad rows of these sources are reported by their own splits, not by the training splits."""
    sink: Counter[str] = Counter()
    keys: dict[str, str] = {}
    for r in _load("alpaca_eval", data, sink):
        keys.setdefault(normalise_prompt(r["instruction"]), "AlpacaEval")
    for r in _load("beavertails", data, sink):
        if beavertails_half(r["prompt"]) == "eval":
            keys.setdefault(normalise_prompt(r["prompt"]), "BeaverTails eval half")
    for r in _load("truthfulqa", data, sink):
        if r["index"] >= HONEST_TRAIN_QUESTIONS:
            keys.setdefault(normalise_prompt(r["question"]), "TruthfulQA 409-817")
    for r in _xstest(data)[0]:
        keys.setdefault(normalise_prompt(r["prompt"]), "XSTest")
    for r in _harmful(data)[0]:
        keys.setdefault(normalise_prompt(r["prompt"]), f"safety-tuned-llamas {r['set']}")
    return keys


def _eval_hit(keys: dict[str, str], instruction: str, input_text: str = "") -> str | None:
    """The evaluation set whose prompt equals this instruction or this whole user text, if any."""
    hit = keys.get(normalise_prompt(instruction))
    if hit is None and input_text:
        hit = keys.get(normalise_prompt(f"{instruction}\n\n{input_text}"))
    return hit


def _decontaminate(examples: list[Example], keys: dict[str, str], excluded: Counter[str]) -> list[Example]:
    """Drop examples whose instruction, or whole user text, is an evaluation prompt."""
    kept = []
    for ex in examples:
        hit = _eval_hit(keys, ex.instruction, ex.input)
        if hit is None:
            kept.append(ex)
        else:
            excluded[f"{ex.source}: is an evaluation prompt ({hit})"] += 1
    return kept


def _alpaca_rows(data: DataConfig, keys: dict[str, str], skipped: Counter[str], excluded: Counter[str]) -> list[dict[str, Any]]:
    """Alpaca minus evaluation prompts: the rows the helpful training sample is drawn from."""
    kept = []
    for r in _load("alpaca", data, skipped):
        hit = _eval_hit(keys, r["instruction"], r["input"])
        if hit is None:
            kept.append(r)
        else:
            excluded[f"alpaca: is an evaluation prompt ({hit})"] += 1
    return kept


def _helpful_train(data: DataConfig, keys: dict[str, str], skipped: Counter[str], excluded: Counter[str]) -> list[Example]:
    kept = _alpaca_rows(data, keys, skipped, excluded)  # filtered before sampling so that exactly helpful_rows remain
    if not kept:
        return []
    if len(kept) < data.helpful_rows:
        raise AlignXError(
            f"data.helpful_rows={data.helpful_rows} but only {len(kept)} Alpaca rows remain after removing "
            f"evaluation prompts and bad rows ({sum(skipped.values())} skipped); lower data.helpful_rows"
        )
    sample = seeded_subset(kept, data.helpful_rows, data.seed)
    if len(sample) < len(kept):
        excluded[f"alpaca: not in the data.helpful_rows={data.helpful_rows} sample"] += len(kept) - len(sample)
    return [Example("helpful", r["instruction"], r["input"], r["output"], "alpaca", f"alpaca:{r['index']}") for r in sample]


def _harmless_train(data: DataConfig, keys: dict[str, str], skipped: Counter[str], excluded: Counter[str]) -> list[Example]:
    examples = [
        Example("harmless", r["instruction"], r["input"], r["output"], "safety_tuned_llamas", f"safety_tuned_llamas:{r['index']}")
        for r in _load("safety_tuned_llamas", data, skipped)
    ]
    for r in _load("hh_rlhf_harmless", data, skipped):
        turn = last_turn(r["chosen"])
        if turn is None:
            skipped["hh_rlhf_harmless: chosen dialogue does not end with a Human/Assistant turn"] += 1
        elif not turn[0]:
            skipped["hh_rlhf_harmless: empty last human turn"] += 1
        elif not turn[1]:
            skipped["hh_rlhf_harmless: empty last assistant turn"] += 1
        else:
            examples.append(Example("harmless", turn[0], "", turn[1], "hh_rlhf_harmless", f"hh_rlhf_harmless:{r['index']}"))
    for r in _load("beavertails", data, skipped):
        if beavertails_half(r["prompt"]) != "dev":
            excluded["beavertails: eval-half prompt"] += 1
        elif not r["is_safe"]:
            excluded["beavertails: dev row with is_safe=false"] += 1
        else:
            examples.append(Example("harmless", r["prompt"], "", r["response"], "beavertails", f"beavertails:{r['index']}"))
    return _decontaminate(examples, keys, excluded)


def _honest_train(data: DataConfig, keys: dict[str, str], skipped: Counter[str], excluded: Counter[str]) -> list[Example]:
    examples = []
    for r in _load("truthfulqa", data, skipped):
        if r["index"] >= HONEST_TRAIN_QUESTIONS:
            excluded["truthfulqa: evaluation question (409-817)"] += 1
            continue
        for j, answer in enumerate(r["correct_answers"]):
            examples.append(Example("honest", r["question"], "", answer, "truthfulqa", f"truthfulqa:{r['index']}:{j}"))
    return _decontaminate(examples, keys, excluded)


# --------------------------------------------------------------------------------------------
# evaluation


def evaluation_prompts(axis: str, data: DataConfig, limit: int | None = None) -> SplitResult:
    """The evaluation prompts of ``axis``; ``limit`` keeps a seeded subset (in order) for quick runs.

    ``data.max_rows_per_axis`` does not apply here: it caps training data only.
    """
    _check_axis(axis)
    skipped: Counter[str] = Counter()
    excluded: Counter[str] = Counter()
    examples: list[Example] = []
    if axis == "helpful":
        for r in _load("alpaca_eval", data, skipped):
            examples.append(Example("helpful", r["instruction"], "", r["output"], "alpaca_eval", f"alpaca_eval:{r['index']}"))
    elif axis == "harmless":
        seen: set[str] = set()
        for r in _load("beavertails", data, skipped):
            if beavertails_half(r["prompt"]) != "eval":
                excluded["beavertails: dev-half row"] += 1
            elif r["prompt"] in seen:
                excluded["beavertails: repeated eval prompt"] += 1
            else:
                seen.add(r["prompt"])
                examples.append(Example("harmless", r["prompt"], "", "", "beavertails", f"beavertails:{r['index']}"))
    else:
        for r in _load("truthfulqa", data, skipped):
            if r["index"] < HONEST_TRAIN_QUESTIONS:
                excluded["truthfulqa: training question (1-408)"] += 1
                continue
            examples.append(Example("honest", r["question"], "", r["best_answer"], "truthfulqa", f"truthfulqa:{r['index']}"))
    if limit is not None and 0 < limit < len(examples):
        excluded[f"limit={limit}"] += len(examples) - limit
        examples = seeded_subset(examples, limit, data.seed)
    return _finish(axis, "evaluation", examples, skipped, excluded)


def gold_responses(axis: str, data: DataConfig, limit: int | None = None) -> SplitResult:
    """Held-out (prompt, gold response) pairs of ``axis``, for teacher-forced loss: helpful = Alpaca rows
    outside the ``data.helpful_rows`` training sample (and no evaluation prompt); harmless = BeaverTails
    eval-half responses labelled safe, the first per distinct prompt; honest = every correct answer of
    TruthfulQA questions 409-817. None of them is a training row of any axis. ``limit`` keeps a seeded
    subset (in order)."""
    _check_axis(axis)
    skipped: Counter[str] = Counter()
    excluded: Counter[str] = Counter()
    examples: list[Example] = []
    if axis == "helpful":
        kept = _alpaca_rows(data, evaluation_keys(data), skipped, excluded)
        trained = {r["index"] for r in seeded_subset(kept, data.helpful_rows, data.seed)}
        examples = [Example("helpful", r["instruction"], r["input"], r["output"], "alpaca", f"alpaca:{r['index']}")
                    for r in kept if r["index"] not in trained and r["output"].strip()]
        excluded["alpaca: in the training sample"] += len(trained)
    elif axis == "harmless":
        seen: set[str] = set()
        for r in _load("beavertails", data, skipped):
            if beavertails_half(r["prompt"]) != "eval" or not r["is_safe"] or r["prompt"] in seen:
                excluded["beavertails: dev half, unsafe, or a repeated prompt"] += 1
                continue
            seen.add(r["prompt"])
            examples.append(Example("harmless", r["prompt"], "", r["response"], "beavertails", f"beavertails:{r['index']}"))
    else:
        for r in _load("truthfulqa", data, skipped):
            if r["index"] < HONEST_TRAIN_QUESTIONS:
                excluded["truthfulqa: training question (1-408)"] += 1
                continue
            examples += [Example("honest", r["question"], "", answer, "truthfulqa", f"truthfulqa:{r['index']}:{j}")
                         for j, answer in enumerate(r["correct_answers"])]
    if limit is not None and 0 < limit < len(examples):
        excluded[f"limit={limit}"] += len(examples) - limit
        examples = seeded_subset(examples, limit, data.seed)
    return _finish(axis, "gold-response", examples, skipped, excluded)


def _xstest(data: DataConfig) -> tuple[list[dict[str, Any]], Counter[str]]:
    skipped: Counter[str] = Counter()
    rows = [
        {"id": r["id"], "prompt": r["prompt"], "type": r["type"], "label": r["label"], "focus": r["focus"], "note": r["note"]}
        for r in _load("xstest", data, skipped)
    ]
    return rows, skipped


def xstest_prompts(data: DataConfig) -> list[dict[str, Any]]:
    """XSTest's 450 prompts: {id, prompt, type, label ("safe" 250 / "unsafe" 200), focus, note}."""
    return _xstest(data)[0]


def _harmful(data: DataConfig) -> tuple[list[dict[str, Any]], Counter[str]]:
    skipped: Counter[str] = Counter()
    rows = []
    for set_name in HARMFUL_EVAL_SETS:
        for r in _load(f"stl_eval:{set_name}", data, skipped):
            prompt = f"{r['instruction']}\n\n{r['input']}" if r["input"] else r["instruction"]
            rows.append({"id": f"{set_name}:{r['index']}", "prompt": prompt, "set": set_name})
    return rows, skipped


def harmful_eval_prompts(data: DataConfig) -> list[dict[str, Any]]:
    """Clearly harmful requests for the refusal rate: the safety-tuned-llamas evaluation sets
    I-MaliciousInstructions, I-CoNa, I-Controversial, Q-Harm and I-PhysicalSafetyUnsafe
    (518 prompts), as {id "<set>:<row>", prompt, set}."""
    return _harmful(data)[0]


# --------------------------------------------------------------------------------------------
# `alignx data check`


@dataclass
class SplitReport:
    name: str  # e.g. "train/helpful", "eval/harmless", "xstest", "harmful_eval"
    rows: int
    skipped: Counter[str]
    sha256: str
    excluded: Counter[str] = field(default_factory=Counter)


def check_all(data: DataConfig) -> list[SplitReport]:
    """Build every split once and report its size, skipped rows by reason, and hash."""
    reports = []
    for kind, build in (("train", training_examples), ("eval", evaluation_prompts)):
        for axis in AXES:
            res = build(axis, data)
            reports.append(SplitReport(f"{kind}/{axis}", len(res.examples), res.skipped, res.sha256, res.excluded))
    for name, build_rows in (("xstest", _xstest), ("harmful_eval", _harmful)):
        rows, skipped = build_rows(data)
        reports.append(SplitReport(name, len(rows), +skipped, rows_sha256(rows)))
    return reports


def format_check_report(reports: list[SplitReport]) -> str:
    """An aligned table (split, rows, skipped, sha256), then one line per skip / exclusion reason."""
    header = ("split", "rows", "skipped", "sha256")
    table = [header] + [(r.name, str(r.rows), str(sum(r.skipped.values())), r.sha256) for r in reports]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    right = {1, 2}
    lines = [
        "  ".join(cell.rjust(w) if i in right else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))).rstrip()
        for row in table
    ]
    name_w = max(len(r.name) for r in reports) if reports else 0
    skip_lines = [
        f"skipped   {r.name.ljust(name_w)}  {n:>6}  {reason}" for r in reports for reason, n in sorted(r.skipped.items())
    ]
    excl_lines = [
        f"excluded  {r.name.ljust(name_w)}  {n:>6}  {reason}" for r in reports for reason, n in sorted(r.excluded.items())
    ]
    if skip_lines:
        lines += ["", "bad rows skipped, by reason:", *skip_lines]
    else:
        lines += ["", "no bad rows skipped"]
    if excl_lines:
        lines += ["", "rows left out by design:", *excl_lines]
    return "\n".join(lines)


__all__ = [
    "Example",
    "SplitResult",
    "SplitReport",
    "beavertails_half",
    "check_all",
    "evaluation_prompts",
    "evaluation_keys",
    "examples_sha256",
    "format_check_report",
    "harmful_eval_prompts",
    "last_turn",
    "normalise_prompt",
    "seeded_subset",
    "training_examples",
    "xstest_prompts",
]
