"""The labelled judge data of METHOD.md section 1, as :class:`JudgeItem` lists with their validation folds.

Each task's data says how it is validated, always on labels the fitted judge never saw:

- ``safety``: BeaverTails 30k_test **dev** half + PKU-SafeRLHF 2k train; the BeaverTails **eval** half
  (human ``is_safe``) validates. Label: unsafe.
- ``truth`` / ``info``: TruthfulQA ``finetune_truth`` / ``finetune_info`` human labels; questions 1-408
  train, 409-817 validate. Each item carries its question's reference answers (matched by question text).
- ``helpfulness``: AlpacaEval GPT-4 (``alpaca_eval_gpt4``) pairwise verdicts between the reference
  (output_1) and a model's answer (output_2); label: the model's answer wins. Ties and invalid verdicts
  are dropped. Instructions are hashed into 5 folds: the judge is validated out-of-fold, on instructions
  it never saw, and the stored judge is fit on all folds.
- ``refusal``: XSTest's human-labelled completions of 5 models; label: refusal (full or partial, as
  XSTest counts refusals). Validated leave-one-model-out; the stored judge is fit on all models.

``subsets`` name extra masks reported as their own accuracy: ``nonverbatim`` (truth/info: answers that
are not a verbatim copy of a reference answer) and ``lenmatched`` (helpfulness: pairs whose word counts
differ by at most :data:`LENGTH_MATCH_RATIO`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from alignx.config import DataConfig
from alignx.data.registry import XSTEST_COMPLETION_MODELS, load_source
from alignx.data.splits import HONEST_TRAIN_QUESTIONS, beavertails_half, normalise_prompt
from alignx.errors import AlignXError
from alignx.eval.judges.base import JudgeItem, JudgeSettings

TRAIN, VALIDATION = "train", "validation"
HELPFULNESS_ANNOTATIONS = ("alpaca_eval_gpt4:alpaca-7b", "alpaca_eval_gpt4:llama-2-7b-chat-hf", "alpaca_eval_gpt4:zephyr-7b-beta")
HELPFULNESS_FOLDS = 5
LENGTH_MATCH_RATIO = 1.25  # "similar length": the longer answer has at most 1.25x the words of the shorter


@dataclass
class JudgeData:
    """Labelled items of one task and how they are validated.

    ``holdout`` is the group that validates a judge fit on the other groups (that fit is the stored
    judge); ``None`` means leave-one-group-out over ``groups`` and a stored judge fit on everything.
    """

    task: str
    items: list[JudgeItem]
    labels: np.ndarray  # bool: the task's positive class (judges.POSITIVE)
    groups: np.ndarray  # str per item
    holdout: str | None
    subsets: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.items:
            raise AlignXError(f"no labelled {self.task} judge data was found")

    @property
    def train_mask(self) -> np.ndarray:
        """Items the stored judge is fit on."""
        return np.ones(len(self.items), bool) if self.holdout is None else self.groups != self.holdout

    def subset(self, mask: np.ndarray) -> "JudgeData":
        keep = np.flatnonzero(mask)
        return JudgeData(self.task, [self.items[i] for i in keep], self.labels[keep], self.groups[keep], self.holdout,
                         {name: m[keep] for name, m in self.subsets.items()})

    def sha256(self, mask: np.ndarray) -> str:
        """Hash of the exact rows under ``mask`` (every item field and the label), in order."""
        rows = [[it.prompt, it.response, it.reference, list(it.correct_answers), list(it.incorrect_answers), bool(y)]
                for it, y, keep in zip(self.items, self.labels, mask) if keep]
        return hashlib.sha256(json.dumps(rows, ensure_ascii=False, separators=(",", ":")).encode("utf-8")).hexdigest()


def data_dir(settings: JudgeSettings) -> Path | None:
    """The judge data's directory: ``settings.data_dir``, else $ALIGNX_DATA_DIR, else None (the hub)."""
    return DataConfig(data_dir=None if settings.data_dir is None else str(settings.data_dir)).resolved_data_dir()


def judge_data(task: str, settings: JudgeSettings) -> JudgeData:
    return {"safety": _safety, "truth": _truthfulqa, "info": _truthfulqa, "helpfulness": _helpfulness, "refusal": _refusal}[task](
        task, data_dir(settings)
    )


def _safety(task: str, root: Path | None) -> JudgeData:
    items, labels, groups = [], [], []
    for r in load_source("beavertails", root).rows:
        items.append(JudgeItem(r["prompt"], r["response"]))
        labels.append(not r["is_safe"])
        groups.append(TRAIN if beavertails_half(r["prompt"]) == "dev" else VALIDATION)
    for r in load_source("pku_saferlhf", root).rows:
        items.append(JudgeItem(r["prompt"], r["response"]))
        labels.append(r["is_harmful"])
        groups.append(TRAIN)
    return JudgeData(task, items, np.array(labels), np.array(groups), VALIDATION)


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
    items, labels, groups = [], [], []
    for r in load_source(f"truthfulqa_finetune_{task}", root).rows:
        question = questions.get(normalise_prompt(r["question"]))
        if question is None:
            continue  # a question of an older TruthfulQA version: no references to compare with
        items.append(JudgeItem(r["question"], r["answer"], correct_answers=tuple(question["correct_answers"]),
                               incorrect_answers=tuple(question["incorrect_answers"])))
        labels.append(r["label"])
        groups.append(TRAIN if question["index"] < HONEST_TRAIN_QUESTIONS else VALIDATION)
    nonverbatim = np.array([not is_verbatim(item) for item in items])
    return JudgeData(task, items, np.array(labels), np.array(groups), VALIDATION, {"nonverbatim": nonverbatim})


def word_count(text: str) -> int:
    return len(text.split())


def is_length_matched(item: JudgeItem) -> bool:
    shorter, longer = sorted((max(word_count(item.response), 1), max(word_count(item.reference or ""), 1)))
    return longer <= LENGTH_MATCH_RATIO * shorter


def _helpfulness(task: str, root: Path | None) -> JudgeData:
    items, labels, groups = [], [], []
    for annotation in HELPFULNESS_ANNOTATIONS:
        for r in load_source(f"alpaca_eval_annotations:{annotation}", root).rows:
            if r["preference"] not in (1.0, 2.0):
                continue  # 0 marks an invalid verdict; 1.5 a tie
            items.append(JudgeItem(r["instruction"], r["output_2"], reference=r["output_1"]))
            labels.append(r["preference"] == 2.0)
            fold = int(hashlib.sha256(r["instruction"].encode("utf-8")).hexdigest(), 16) % HELPFULNESS_FOLDS
            groups.append(f"instructions-{fold}")
    lenmatched = np.array([is_length_matched(item) for item in items])
    return JudgeData(task, items, np.array(labels), np.array(groups), None, {"lenmatched": lenmatched})


def _refusal(task: str, root: Path | None) -> JudgeData:
    items, labels, groups = [], [], []
    for model in XSTEST_COMPLETION_MODELS:
        for r in load_source(f"xstest_completions:{model}", root).rows:
            items.append(JudgeItem(r["prompt"], r["completion"]))
            labels.append(r["final_label"] != "1_full_compliance")
            groups.append(model)
    return JudgeData(task, items, np.array(labels), np.array(groups), None)


def complete_item(task: str, item: JudgeItem, root: Path | None) -> JudgeItem:
    """Fill what the task needs and the item lacks: TruthfulQA references (truth, info) found by question
    text, the AlpacaEval reference (helpfulness) found by instruction."""
    if task in ("truth", "info") and not item.correct_answers:
        question = truthfulqa_questions(root).get(normalise_prompt(item.prompt))
        if question is None:
            raise AlignXError(f"no correct_answers given and the prompt is not a TruthfulQA question: {item.prompt[:80]!r}")
        return replace(item, correct_answers=tuple(question["correct_answers"]), incorrect_answers=tuple(question["incorrect_answers"]))
    if task == "helpfulness" and item.reference is None:
        references = {normalise_prompt(r["instruction"]): r["output"] for r in load_source("alpaca_eval", root).rows}
        reference = references.get(normalise_prompt(item.prompt))
        if reference is None:
            raise AlignXError(f"no reference given and the prompt is not an AlpacaEval instruction: {item.prompt[:80]!r}")
        return replace(item, reference=reference)
    return item
