"""The labelled judge data of METHOD.md section 1, as :class:`JudgeItem` lists, and how each judge is validated.

A judge is validated the way it is used: on prompts it was never fit on, and, where the benchmark scores
responses of a model the judge never saw, on a held-out system too. Two schemes:

- **fixed split** (``folds == 1``): ``safety`` (fit on the BeaverTails 30k_test **dev** half + PKU-SafeRLHF 2k,
  validated on the **eval** half with its human ``is_safe``; label: unsafe) and ``truth`` / ``info``
  (TruthfulQA ``finetune_truth`` / ``finetune_info`` human labels; questions 1-408 fit, 409-817 validate).
  Training rows whose prompt is an evaluation prompt of any benchmark (:func:`alignx.data.splits.evaluation_keys`),
  or a near-duplicate of one (:func:`near_duplicates`), are dropped and counted in ``excluded``.
- **cross-fit** (``folds == K``): ``helpfulness`` (AlpacaEval's pairwise verdicts between a reference answer,
  output_1, and a model's answer, output_2; label: the model's answer wins) and ``refusal`` (XSTest's
  human-labelled completions of 5 models; label: refusal, full or partial). Their data are answers to the very
  prompts the benchmarks use, so prompts are hashed into K folds (:func:`prompt_fold`) and the stored judge is K
  estimators: estimator k is fit on the other folds, and a prompt is always scored by its own fold's estimator,
  so no judge scores a prompt it was fit on. Validation holds out a fold and a system together (fit on the other
  systems' answers to the other folds' prompts), because at evaluation both the prompt and the model are new to
  the judge.

Helpfulness has two **reference sets** (:data:`HELPFULNESS_REFERENCE_SETS`, ``reference_sets`` per row): GPT-4's
verdicts against text-davinci-003's answers (``alpaca_eval_gpt4``: alpaca-7b, llama-2-7b-chat-hf, zephyr-7b-beta;
the reference the evaluation scores against, so the rows its ``validation`` mask marks) and GPT-4-Turbo's against
GPT-4-Turbo's own answers (``weighted_alpaca_eval_gpt4_turbo``: alpaca-7b and text-davinci-003's other sample,
the one in ``reference_outputs/``). The stored judge learns from both; validation also fits on one set
and scores the other's held-out systems, because a judge that only ever met one reference answer set learns that
set's habits (offline.py, ``leave_reference_out``).

Draws (AlpacaEval's preference 0 for GPT-4, exactly 1.5 for the weighted GPT-4-Turbo) are kept as unlabelled rows
(``labelled`` False, ``outcomes`` 0.5): no judge fits or is scored on them, but they count half in a system's win
rate, as on the leaderboard. The weighted annotator's preference is a probability in [1, 2]; its verdict is the
side above 1.5, as AlpacaEval's ``discrete_win_rate`` reads it.

``subsets`` name extra masks reported as their own accuracy: ``nonverbatim`` (truth/info: answers that
are not a verbatim copy of a reference answer) and ``lenmatched`` (helpfulness: pairs whose word counts
differ by at most :data:`LENGTH_MATCH_RATIO`).
"""

from __future__ import annotations

import hashlib
import json
import re
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


@dataclass(frozen=True)
class ReferenceSet:
    """One AlpacaEval annotation set: who judged, against whose answers, which systems' answers."""

    annotator: str  # AlpacaEval's annotator id, the folder under annotations/
    reference: str  # the generator of output_1, the reference answers
    judged_by: str  # in words, for figures
    systems: tuple[str, ...]  # systems whose per-pair verdicts are staged
    # systems whose verdicts are not staged but whose answers (model_outputs/) and the annotator's leaderboard win
    # rate of exactly those answers are: a system-level check only, against the reference answers in `answers`
    published_only: tuple[str, ...] = ()
    answers: str | None = None  # source of the reference answers for published_only
    leaderboard: str | None = None  # source of the annotator's leaderboard


HELPFULNESS_REFERENCE_SETS = (
    ReferenceSet("alpaca_eval_gpt4", "text_davinci_003", "GPT-4", HELPFULNESS_GENERATORS),
    # text_davinci_003 here is reference_outputs/'s sample, not the alpaca_eval_gpt4 references (20 of 805 agree)
    ReferenceSet("weighted_alpaca_eval_gpt4_turbo", "gpt4_1106_preview", "GPT-4-Turbo", ("alpaca-7b", "text_davinci_003"),
                 published_only=("llama-2-7b-chat-hf", "zephyr-7b-beta"), answers="alpaca_eval_reference:gpt4_1106_preview",
                 leaderboard="alpaca_eval_leaderboard:weighted_alpaca_eval_gpt4_turbo"),
)
EVALUATION_REFERENCE = HELPFULNESS_REFERENCE_SETS[0].reference  # what `alignx eval` scores AlpacaEval answers against
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
    reference_sets: np.ndarray | None = None  # helpfulness: the reference generator per row (HELPFULNESS_REFERENCE_SETS)
    # helpfulness: (system, reference) -> the annotator's published win rate (%) of rows that carry no verdict
    system_level: dict[tuple[str, str], float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.items:
            raise AlignXError(f"no labelled {self.task} judge data was found")
        if self.labelled is None:
            self.labelled = np.ones(len(self.items), bool)
        if self.reference_sets is None:
            self.reference_sets = np.full(len(self.items), "", dtype=object)

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
                + ([str(reference)] if reference else [])
                for it, system, y, reference, keep in zip(self.items, self.systems, self.labels, self.reference_sets, mask) if keep]
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
                   reference_sets=data.reference_sets[keep],
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


CUT_WORDS = 36  # about 48 SmolLM2 tokens of English prose: the evaluation's answer budget (eval.max_new_tokens)
CUT_MIN_WORDS = 12  # about alignx.eval.length.MIN_TOKENS (16 tokens)
_WORD_END = re.compile(r"\S+")


def cut_to_words(text: str, words: int = CUT_WORDS) -> str:
    """``text`` up to the end of its ``words``-th whitespace-separated word, its own spacing and line breaks kept
    (the structure cues of :func:`alignx.eval.judges.features.text_shape` read them)."""
    ends = [m.end() for m, _ in zip(_WORD_END.finditer(text), range(words))]
    return text[: ends[-1]] if len(ends) == words else text


def cut_pair(item: JudgeItem, words: int = CUT_WORDS, min_words: int = CUT_MIN_WORDS) -> JudgeItem:
    """The pair as the evaluation's equal-length comparison sees it (:func:`alignx.eval.length.equal_length_pair`,
    counted in words instead of tokens): the response capped at ``words`` (the generation budget), then both texts
    cut to the shorter one's length, but to no fewer than ``min_words`` (a text shorter than that stays whole)."""
    response = cut_to_words(item.response, words)
    length = max(min(word_count(response), word_count(item.reference or "")), min_words)
    return replace(item, response=cut_to_words(response, length), reference=cut_to_words(item.reference or "", length))


def is_length_matched(item: JudgeItem) -> bool:
    shorter, longer = sorted((max(word_count(item.response), 1), max(word_count(item.reference or ""), 1)))
    return longer <= LENGTH_MATCH_RATIO * shorter


def _annotations(generator: str, root: Path | None, annotator: str = "alpaca_eval_gpt4") -> list[dict]:
    return load_source(f"alpaca_eval_annotations:{annotator}:{generator}", root).rows


def annotator_outcome(preference: float, annotator: str) -> float | None:
    """An AlpacaEval verdict as 1 (output_2 wins), 0 (loses) or 0.5 (draw); None for a value that is no verdict.
    GPT-4 (alpaca_eval_gpt4) says 1, 2 or 0 (a draw); a weighted annotator gives P(output_2) + 1 in [1, 2]."""
    if annotator.startswith("weighted_"):
        if not 1.0 <= preference <= 2.0:
            return None
        return 0.5 if preference == 1.5 else float(preference > 1.5)
    return {0.0: 0.5, 1.0: 0.0, 2.0: 1.0}.get(preference)  # 1.5 would be a tie; none exist in these files


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


def discrete_win_rates(leaderboard: str, root: Path | None) -> dict[str, float]:
    """Each system's hard-verdict win rate (%, a draw half) on an AlpacaEval leaderboard."""
    return {r["model"]: r["discrete_win_rate"] for r in load_source(leaderboard, root).rows if r["discrete_win_rate"] is not None}


def _helpfulness(task: str, root: Path | None) -> JudgeData:
    """Rows of every reference set; the stored judge is fit on the evaluation's reference set (``train``), and its
    rows are the ones validated as the judge is used (``validation``); the other rows serve the reference checks."""
    items, outcomes, systems, references, system_level = [], [], [], [], {}
    for reference_set in HELPFULNESS_REFERENCE_SETS:
        for generator in reference_set.systems:
            for r in _annotations(generator, root, reference_set.annotator):
                outcome = annotator_outcome(r["preference"], reference_set.annotator)
                if outcome is None:
                    continue
                items.append(JudgeItem(r["instruction"], r["output_2"], reference=r["output_1"]))
                outcomes.append(outcome)
                systems.append(generator)
                references.append(reference_set.reference)
        if reference_set.published_only:
            answers = {normalise_prompt(r["instruction"]): r["output"] for r in load_source(reference_set.answers, root).rows}
            board = discrete_win_rates(reference_set.leaderboard, root)
            for generator in reference_set.published_only:
                if generator not in board:
                    raise AlignXError(f"{reference_set.leaderboard} has no row for {generator}")
                system_level[(generator, reference_set.reference)] = board[generator]
                for r in load_source(f"alpaca_eval_outputs:{generator}", root).rows:
                    items.append(JudgeItem(r["instruction"], r["output"], reference=answers[normalise_prompt(r["instruction"])]))
                    outcomes.append(np.nan)  # no verdict staged: neither fit nor scored pair by pair
                    systems.append(generator)
                    references.append(reference_set.reference)
    outcomes, references = np.array(outcomes, dtype=float), np.array(references, dtype=object)
    lenmatched = np.array([is_length_matched(item) for item in items])
    evaluation = references == EVALUATION_REFERENCE
    return JudgeData(task, items, outcomes == 1.0, np.array(systems), evaluation, evaluation, PROMPT_FOLDS,
                     labelled=np.isfinite(outcomes) & (outcomes != 0.5), outcomes=outcomes, subsets={"lenmatched": lenmatched},
                     published=gpt4_win_rates(root), reference_sets=references, system_level=system_level)


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
