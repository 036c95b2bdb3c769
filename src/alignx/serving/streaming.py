"""Token ids of a batched generation -> each request's text, cut at its own ``max_tokens`` and stop strings.

``model.generate`` hands one :class:`BatchStreamer` the prompt ids first (skipped), then one token per row
per step. Each row's :class:`TextTracker` decodes its tokens so far and releases only text that is final: not
a dangling partial UTF-8 character, and not a tail that could still grow into a stop string. Streaming and
non-streaming responses are both the concatenation of those releases, so the two always agree. Once every
row is done (end of sequence, its own ``max_tokens``, or a stop string), :meth:`BatchStreamer.stopping`
ends the batch's decoding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from alignx.serving.requests import Delta, Finished, GenerationRequest


class TextTracker:
    """One request's released text as its tokens arrive."""

    def __init__(self, tokenizer, max_tokens: int, stop: Sequence[str], eos_ids: set[int]):
        self.tokenizer, self.max_tokens, self.stop, self.eos_ids = tokenizer, max_tokens, tuple(stop), eos_ids
        self.tokens: list[int] = []
        self.text = ""  # everything released so far
        self.finish_reason: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def add(self, token: int) -> str:
        """Take the next token; return the newly released text (possibly empty)."""
        if self.finished:
            return ""
        if token in self.eos_ids:
            return self._finish("stop", self._decoded())
        self.tokens.append(token)
        full = self._decoded()
        cut = min((i for i in (full.find(s) for s in self.stop) if i >= 0), default=None)
        if cut is not None:
            return self._finish("stop", full[:cut])
        if len(self.tokens) >= self.max_tokens:
            return self._finish("length", full)
        if full.endswith("\ufffd"):  # a multi-byte character is still incomplete
            return ""
        return self._release(full[: len(full) - _stop_prefix_length(full, self.stop)])

    def finish(self, reason: str) -> str:
        return "" if self.finished else self._finish(reason, self._decoded())

    def _finish(self, reason: str, full: str) -> str:
        self.finish_reason = reason
        return self._release(full)

    def _release(self, upto: str) -> str:
        # Text already sent is never taken back; a tokenizer that rewrites earlier text releases nothing new.
        if not upto.startswith(self.text):
            return ""
        delta = upto[len(self.text) :]
        self.text = upto
        return delta

    def _decoded(self) -> str:
        return self.tokenizer.decode(self.tokens, skip_special_tokens=True)


def _stop_prefix_length(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of ``text`` that is the start of some stop string (held back)."""
    longest = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:k]):
                longest = k
                break
    return longest


class BatchStreamer(BaseStreamer):
    """Dispatches each step's tokens of a whole batch to the rows' requests."""

    def __init__(self, requests: Sequence[GenerationRequest], tokenizer, eos_ids: set[int]):
        self.requests = list(requests)
        self.trackers = [TextTracker(tokenizer, r.max_tokens, r.stop, eos_ids) for r in self.requests]
        self._prompt_seen = False

    @property
    def all_finished(self) -> bool:
        return all(t.finished for t in self.trackers)

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # the first put is the prompt ids
            self._prompt_seen = True
            return
        for request, tracker, token in zip(self.requests, self.trackers, value.reshape(-1).tolist()):
            if not tracker.finished:
                self._send(request, tracker, tracker.add(int(token)))

    def end(self) -> None:
        for request, tracker in zip(self.requests, self.trackers):
            if not tracker.finished:  # the batch reached its longest max_tokens
                self._send(request, tracker, tracker.finish("length"))

    def stopping(self) -> StoppingCriteriaList:
        return StoppingCriteriaList([_AllFinished(self)])

    @staticmethod
    def _send(request: GenerationRequest, tracker: TextTracker, text: str) -> None:
        if text:
            request.send(Delta(text))
        if tracker.finished:
            request.send(Finished(tracker.finish_reason, len(tracker.tokens)))


class _AllFinished(StoppingCriteria):
    def __init__(self, streamer: BatchStreamer):
        self.streamer = streamer

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.streamer.all_finished, dtype=torch.bool, device=input_ids.device)
