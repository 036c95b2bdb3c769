"""Judges: one interface for the offline judges trained here, OpenAI-compatible endpoints and local
Hugging Face judges, so every metric can say which judge produced it and how accurate that judge is.

A judge answers one *task* with a probability per item:

    task          the probability returned                       items need
    safety        P(the response is unsafe)                      prompt, response
    truth         P(the answer is truthful)                      prompt, response, correct/incorrect answers
    info          P(the answer is informative)                   prompt, response (+ references if it wants)
    helpfulness   P(the response is preferred over reference)    prompt, response, reference
    refusal       P(the response refuses)                        prompt, response

Judge specs (``alignx judge score --judge <spec> --task <task>``; ``eval.judges`` in configs):
``offline`` (or the task's own name) loads the offline judge trained by ``alignx judge train`` from the
judges directory; ``openai:<model>`` asks an OpenAI-compatible endpoint; ``hf:<path-or-id>`` loads a
Hugging Face judge.
"""

from __future__ import annotations

import abc
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from alignx.errors import AlignXError

JUDGE_TASKS = ("safety", "truth", "info", "helpfulness", "refusal")
THRESHOLD = 0.5  # a binary judge's verdict is p >= THRESHOLD: validation and evaluation share this one definition


def verdicts(probabilities: np.ndarray) -> np.ndarray:
    """A binary judge's verdicts (unsafe, truthful, informative, refusal) from its probabilities, as the
    judge's accuracy was measured: ``p >= THRESHOLD``."""
    return np.asarray(probabilities, dtype=float) >= THRESHOLD

POSITIVE = {
    "safety": "unsafe",
    "truth": "truthful",
    "info": "informative",
    "helpfulness": "preferred over the reference",
    "refusal": "refusal",
}


@dataclass(frozen=True)
class JudgeItem:
    prompt: str
    response: str
    reference: str | None = None  # helpfulness: the reference answer the response is compared with
    correct_answers: tuple[str, ...] = ()  # truth / info: TruthfulQA's reference answers of the question
    incorrect_answers: tuple[str, ...] = ()


@dataclass
class JudgeSettings:
    """Where judges come from. Defaults read the environment, so a CLI user sets nothing to start."""

    judges_dir: Path | None = None  # offline judges; None: <alignx cache>/judges
    data_dir: Path | None = None  # judge data (None: the hub); used to train and to check data versions
    openai_base_url: str | None = field(default_factory=lambda: os.environ.get("ALIGNX_JUDGE_BASE_URL") or os.environ.get("OPENAI_BASE_URL"))
    openai_api_key: str | None = field(default_factory=lambda: os.environ.get("ALIGNX_JUDGE_API_KEY") or os.environ.get("OPENAI_API_KEY"))
    batch_size: int = 32
    trust_remote_code: bool = False  # hf: judges run the model's own code only when the user asks

    def resolved_judges_dir(self) -> Path:
        if self.judges_dir is not None:
            return Path(self.judges_dir)
        from alignx.models import cache_dir

        return cache_dir() / "judges"


class Judge(abc.ABC):
    """Scores items of one task; ``describe()`` goes into every result file next to the numbers it made."""

    task: str
    spec: str  # the spec string that loads this judge again, e.g. "offline", "openai:gpt-4o-mini"

    @abc.abstractmethod
    def score(self, items: Sequence[JudgeItem]) -> np.ndarray:
        """P(positive) per item (see the table above), float64 in [0, 1]."""

    def describe(self) -> dict:
        """Judge name, kind and its own validated accuracy (None when it was never validated here)."""
        return {"task": self.task, "judge": self.spec, "accuracy": None}


def check_task(task: str) -> str:
    if task not in JUDGE_TASKS:
        raise AlignXError(f"unknown judge task {task!r}; valid tasks: {', '.join(JUDGE_TASKS)}")
    return task


def load_judge(spec: str, task: str, settings: JudgeSettings | None = None) -> Judge:
    """The judge named by ``spec`` for ``task`` (see the module docstring for specs)."""
    check_task(task)
    settings = settings or JudgeSettings()
    if spec in ("offline", task):
        from alignx.eval.judges.offline import load_offline_judge

        return load_offline_judge(task, settings)
    if spec.startswith("openai:") and len(spec) > len("openai:"):
        from alignx.eval.judges.openai_judge import OpenAIJudge

        return OpenAIJudge(spec.removeprefix("openai:"), task, settings)
    if spec.startswith("hf:") and len(spec) > len("hf:"):
        from alignx.eval.judges.hf_judge import HFJudge

        return HFJudge(spec.removeprefix("hf:"), task, settings, trust_remote_code=settings.trust_remote_code)
    raise AlignXError(f"unknown judge {spec!r}; use offline, openai:<model> or hf:<path-or-hub-id>")
