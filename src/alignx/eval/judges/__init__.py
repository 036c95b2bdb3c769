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

from alignx.errors import AlignXError
from alignx.eval.judges.base import (
    JUDGE_TASKS, POSITIVE, THRESHOLD, Judge, JudgeItem, JudgeSettings, check_task, verdicts,
)

__all__ = ["JUDGE_TASKS", "POSITIVE", "THRESHOLD", "Judge", "JudgeItem", "JudgeSettings", "check_task", "load_judge", "verdicts"]


def load_judge(spec: str, task: str, settings: JudgeSettings | None = None) -> Judge:
    """The judge named by ``spec`` for ``task`` (see the module docstring for specs)."""
    check_task(task)
    settings = settings or JudgeSettings()
    # each backend is imported when asked for: the OpenAI and Hugging Face ones pull in their client libraries
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
