"""The labelled judge data of METHOD.md section 1, as :class:`JudgeItem` lists, and how each judge is validated.

A judge is validated the way it is used: on prompts it was never fit on, and, where the benchmark scores
responses of a model the judge never saw, on a held-out system too. Two schemes:

- **fixed split** (``folds == 1``): ``safety`` (fit on the BeaverTails 30k_test **dev** half + PKU-SafeRLHF 2k,
  validated on the **eval** half with its human ``is_safe``; label: unsafe) and ``truth`` / ``info``
  (TruthfulQA ``finetune_truth`` / ``finetune_info`` human labels; questions 1-408 fit, 409-817 validate).
  Training rows whose prompt is an evaluation prompt of any benchmark (:func:`alignx.data.splits.evaluation_keys`),
  or a near-duplicate of one (:func:`near_duplicates`), are dropped and counted in ``excluded``.
- **cross-fit** (``folds == K``): ``helpfulness`` (AlpacaEval GPT-4 pairwise verdicts between the
  text-davinci-003 reference, output_1, and the answers of alpaca-7b, llama-2-7b-chat-hf and zephyr-7b-beta,
  output_2; label: the model's answer wins) and ``refusal`` (XSTest's human-labelled completions of 5 models;
  label: refusal, full or partial). Their data are answers to the very prompts the benchmarks use, so prompts
  are hashed into K folds (:func:`prompt_fold`) and the stored judge is K estimators: estimator k is fit on the
  other folds, and a prompt is always scored by its own fold's estimator, so no judge scores a prompt it was fit
  on. Validation holds out a fold and a system together (fit on the other systems' answers to the other folds'
  prompts), because at evaluation both the prompt and the model are new to the judge.

GPT-4's draws (AlpacaEval's preference 0) are kept as unlabelled rows (``labelled`` False, ``outcomes`` 0.5): no
judge fits or is scored on them, but they count half in a system's win rate, as on the leaderboard.

``subsets`` name extra masks reported as their own accuracy: ``nonverbatim`` (truth/info: answers that
are not a verbatim copy of a reference answer) and ``lenmatched`` (helpfulness: pairs whose word counts
differ by at most :data:`LENGTH_MATCH_RATIO`).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Sequence

import numpy as np
from sklearn.feature_extraction.text import CountVectorizer

from alignx.config import DataConfig
from alignx.data.loading import load_source
from alignx.data.registry import XSTEST_COMPLETION_MODELS
from alignx.data.splits import HONEST_TRAIN_QUESTIONS, beavertails_half, evaluation_keys, normalise_prompt
from alignx.errors import AlignXError
from alignx.eval.judges.base import JudgeItem, JudgeSettings

HELPFULNESS_GENERATORS = ("alpaca-7b", "llama-2-7b-chat-hf", "zephyr-7b-beta")  # AlpacaEval's alpaca_eval_gpt4 annotations
PROMPT_FOLDS = 5
LENGTH_MATCH_RATIO = 1.25  # "similar length": the longer answer has at most 1.25x the words of the shorter
NEAR_DUPLICATE_JACCARD = 0.75  # word-set overlap at which two prompts count as one ("best way" vs "best method to poison")


@dataclass
class JudgeData:
    """Labelled items of one task and how they are validated (see the module docstring).

    ``train`` marks rows a judge may be fit on; ``validation`` the rows a fixed split validates on (a
    cross-fit task validates on every labelled row, out of fold). ``systems`` names who wrote each response.
    """

    task: str
    items: list[JudgeItem]
    labels: np.ndarray  # bool: the task's positive class (judges.POSITIVE)
    systems: np.ndarray  # str per item
    train: np.ndarray  # bool
    validation: np.ndarray  # bool
    folds: int = 1
    labelled: np.ndarray | None = None  # bool; None: every row has a label
    outcomes: np.ndarray | None = None  # helpfulness: GPT-4's verdict as 1 (win), 0 (loss), 0.5 (draw)
    subsets: dict[str, np.ndarray] = field(default_factory=dict)
    excluded: dict[str, int] = field(default_factory=dict)  # training rows dropped, by reason
    published: dict[str, float] = field(default_factory=dict)  # helpfulness: GPT-4's leaderboard win rate (%) per system

    def __post_init__(self) -> None:
        if not self.items:
            raise AlignXError(f"no labelled {self.task} judge data was found")
        if self.labelled is None:
            self.labelled = np.ones(len(self.items), bool)

    @cached_property
    def fold(self) -> np.ndarray:
        """The prompt fold of every row (all 0 for a fixed split); hashed once per data set."""
        return np.array([prompt_fold(item.prompt, self.folds) for item in self.items], dtype=int)

    @property
    def fit_mask(self) -> np.ndarray:
        """Rows the stored judge (all its fold estimators together) learns from."""
        return self.train & self.labelled

    @property
    def validation_mask(self) -> np.ndarray:
        return self.validation & self.labelled

    def sha256(self, mask: np.ndarray) -> str:
        """Hash of the exact rows under ``mask`` (every item field, the system and the label), in order."""
        rows = [[it.prompt, it.response, it.reference, list(it.correct_answers), list(it.incorrect_answers), str(system), bool(y)]
                for it, system, y, keep in zip(self.items, self.systems, self.labels, mask) if keep]
        return hashlib.sha256(json.dumps(rows, ensure_ascii=False, separators=(",", ":")).encode("utf-8")).hexdigest()


def prompt_fold(prompt: str, folds: int) -> int:
    """The fold of a prompt: a stable hash of its normalised text, so every copy of a prompt (and any user
    prompt scored later) lands in the same fold."""
    return int(hashlib.sha256(normalise_prompt(prompt).encode("utf-8")).hexdigest(), 16) % folds if folds > 1 else 0


def near_duplicates(texts: Sequence[str], references: Sequence[str], threshold: float = NEAR_DUPLICATE_JACCARD) -> np.ndarray:
    """Per text: whether it equals a reference after :func:`normalise_prompt`, or their lower-cased word sets
    overlap with Jaccard >= ``threshold``."""
    keys = [normalise_prompt(t) for t in texts]
    distinct = sorted(set(keys))  # judge data repeat prompts (TruthfulQA: ~27 answers per question)
    reference_keys = set(map(normalise_prompt, references))
    hit = {key: key in reference_keys for key in distinct}
    if distinct and reference_keys:
        vectorizer = CountVectorizer(binary=True, token_pattern=r"[a-z0-9']+").fit([*distinct, *reference_keys])
        a, r = vectorizer.transform(distinct), vectorizer.transform(sorted(reference_keys))
        shared = (a @ r.T).tocoo()  # shared word counts of every overlapping (text, reference) pair
        jaccard = shared.data / (np.asarray(a.sum(1)).ravel()[shared.row] + np.asarray(r.sum(1)).ravel()[shared.col] - shared.data)
        best = np.zeros(len(distinct))
        np.maximum.at(best, shared.row, jaccard)
        hit.update({key: True for key, value in zip(distinct, best) if value >= threshold})
    return np.array([hit[key] for key in keys], dtype=bool)


def data_dir(settings: JudgeSettings) -> Path | None:
    """The judge data's directory: ``settings.data_dir``, else $ALIGNX_DATA_DIR, else None (the hub)."""
    return DataConfig(data_dir=None if settings.data_dir is None else str(settings.data_dir)).resolved_data_dir()


def judge_data(task: str, settings: JudgeSettings) -> JudgeData:
    return {"safety": _safety, "truth": _truthfulqa, "info": _truthfulqa, "helpfulness": _helpfulness, "refusal": _refusal}[task](
        task, data_dir(settings)
    )


def _decontaminated(data: JudgeData, root: Path | None) -> JudgeData:
    """``data`` without the training rows whose prompt is, or nearly is, an evaluation prompt (counted by system)."""
    keys = list(evaluation_keys(DataConfig(data_dir=None if root is None else str(root))))
    train = np.flatnonzero(data.train)
    hit = near_duplicates([data.items[i].prompt for i in train], keys)
    drop = np.zeros(len(data.items), bool)
    drop[train[hit]] = True
    excluded = Counter(f"{system}: the prompt is, or nearly is, an evaluation prompt" for system in data.systems[drop])
    keep = np.flatnonzero(~drop)
    return replace(data, items=[data.items[i] for i in keep], labels=data.labels[keep], systems=data.systems[keep],
                   train=data.train[keep], validation=data.validation[keep], labelled=data.labelled[keep],
                   subsets={name: mask[keep] for name, mask in data.subsets.items()}, excluded=dict(excluded))


def _safety(task: str, root: Path | None) -> JudgeData:
    items, labels, systems, train = [], [], [], []
    for r in load_source("beavertails", root).rows:
        items.append(JudgeItem(r["prompt"], r["response"]))
        labels.append(not r["is_safe"])
        systems.append("beavertails")
        train.append(beavertails_half(r["prompt"]) == "dev")
    for r in load_source("pku_saferlhf", root).rows:
        items.append(JudgeItem(r["prompt"], r["response"]))
        labels.append(r["is_harmful"])
        systems.append("pku_saferlhf")
        train.append(True)
    train = np.array(train)
    data = JudgeData(task, items, np.array(labels), np.array(systems), train, ~train)
    return _decontaminated(data, root)


def truthfulqa_questions(root: Path | None) -> dict[str, dict]:
    """TruthfulQA rows by normalised question text (how finetune rows and scored answers find their references)."""
    return {normalise_prompt(r["question"]): r for r in load_source("truthfulqa", root).rows}


def is_verbatim(item: JudgeItem) -> bool:
    """The answer is one of the question's reference answers (case, spacing and a final period ignored)."""
    def key(text: str) -> str:
        return normalise_prompt(text).rstrip(".")

    return key(item.response) in {key(a) for a in (*item.correct_answers, *item.incorrect_answers)}


def _truthfulqa(task: str, root: Path | None) -> JudgeData:
    questions = truthfulqa_questions(root)
    items, labels, train = [], [], []
    for r in load_source(f"truthfulqa_finetune_{task}", root).rows:
        question = questions.get(normalise_prompt(r["question"]))
        if question is None:
            continue  # a question of an older TruthfulQA version: no references to compare with
        items.append(JudgeItem(r["question"], r["answer"], correct_answers=tuple(question["correct_answers"]),
                               incorrect_answers=tuple(question["incorrect_answers"])))
        labels.append(r["label"])
        train.append(question["index"] < HONEST_TRAIN_QUESTIONS)
    train = np.array(train)
    nonverbatim = np.array([not is_verbatim(item) for item in items])
    data = JudgeData(task, items, np.array(labels), np.array(["truthfulqa"] * len(items)), train, ~train,
                     subsets={"nonverbatim": nonverbatim})
    return _decontaminated(data, root)


def word_count(text: str) -> int:
    return len(text.split())


def is_length_matched(item: JudgeItem) -> bool:
    shorter, longer = sorted((max(word_count(item.response), 1), max(word_count(item.reference or ""), 1)))
    return longer <= LENGTH_MATCH_RATIO * shorter


def _annotations(generator: str, root: Path | None) -> list[dict]:
    return load_source(f"alpaca_eval_annotations:alpaca_eval_gpt4:{generator}", root).rows


def alpacaeval_references(root: Path | None) -> dict[str, str]:
    """The reference answer of every AlpacaEval instruction, by normalised instruction: the text-davinci-003
    answers GPT-4 compared with in AlpacaEval's ``alpaca_eval_gpt4`` annotations (output_1), which the
    helpfulness judge learned from. They differ from ``reference_outputs/text_davinci_003_model_outputs.json``
    (a later sample of the same model: 20 of 805 texts agree), so a win rate is against these."""
    return {normalise_prompt(r["instruction"]): r["output_1"] for r in _annotations(HELPFULNESS_GENERATORS[0], root)}


def gpt4_win_rates(root: Path | None) -> dict[str, float]:
    """GPT-4's AlpacaEval 1 win rate (%) of each helpfulness generator, from the staged leaderboard."""
    board = {r["model"]: r["win_rate"] for r in load_source("alpaca_eval_leaderboard:alpaca_eval_gpt4", root).rows}
    missing = [g for g in HELPFULNESS_GENERATORS if g not in board]
    if missing:
        raise AlignXError(f"the AlpacaEval leaderboard has no row for {', '.join(missing)}")
    return {g: board[g] for g in HELPFULNESS_GENERATORS}


def _helpfulness(task: str, root: Path | None) -> JudgeData:
    items, outcomes, systems = [], [], []
    for generator in HELPFULNESS_GENERATORS:
        for r in _annotations(generator, root):
            if r["preference"] not in (0.0, 1.0, 2.0):
                continue  # 1.5 would be a tie; none exist in these files
            items.append(JudgeItem(r["instruction"], r["output_2"], reference=r["output_1"]))
            outcomes.append({0.0: 0.5, 1.0: 0.0, 2.0: 1.0}[r["preference"]])  # AlpacaEval counts preference 0 as a draw
            systems.append(generator)
    outcomes = np.array(outcomes)
    everywhere = np.ones(len(items), bool)
    lenmatched = np.array([is_length_matched(item) for item in items])
    return JudgeData(task, items, outcomes == 1.0, np.array(systems), everywhere, everywhere, PROMPT_FOLDS,
                     labelled=outcomes != 0.5, outcomes=outcomes, subsets={"lenmatched": lenmatched},
                     published=gpt4_win_rates(root))


def _refusal(task: str, root: Path | None) -> JudgeData:
    items, labels, systems = [], [], []
    for model in XSTEST_COMPLETION_MODELS:
        for r in load_source(f"xstest_completions:{model}", root).rows:
            items.append(JudgeItem(r["prompt"], r["completion"]))
            labels.append(r["final_label"] != "1_full_compliance")
            systems.append(model)
    everywhere = np.ones(len(items), bool)
    return JudgeData(task, items, np.array(labels), np.array(systems), everywhere, everywhere, PROMPT_FOLDS)


def complete_item(task: str, item: JudgeItem, root: Path | None) -> JudgeItem:
    """Fill what the task needs and the item lacks: TruthfulQA references (truth, info) found by question
    text, the AlpacaEval reference (helpfulness, :func:`alpacaeval_references`) found by instruction."""
    if task in ("truth", "info") and not item.correct_answers:
        question = truthfulqa_questions(root).get(normalise_prompt(item.prompt))
        if question is None:
            raise AlignXError(f"no correct_answers given and the prompt is not a TruthfulQA question: {item.prompt[:80]!r}")
        return replace(item, correct_answers=tuple(question["correct_answers"]), incorrect_answers=tuple(question["incorrect_answers"]))
    if task == "helpfulness" and item.reference is None:
        reference = alpacaeval_references(root).get(normalise_prompt(item.prompt))
        if reference is None:
            raise AlignXError(f"no reference given and the prompt is not an AlpacaEval instruction: {item.prompt[:80]!r}")
        return replace(item, reference=reference)
    return item
