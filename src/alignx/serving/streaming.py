"""A request's token ids -> its text, cut at its own ``max_tokens`` and stop strings.

The decoding loop (:mod:`alignx.serving.decoding`) hands each row's :class:`TextTracker` one token per step. The
tracker decodes the row's tokens so far and releases only text that is final: not a dangling partial UTF-8
character, and not a tail that could still grow into a stop string. Streaming and non-streaming responses are
both the concatenation of those releases, so the two always agree. A row is done at end of sequence, its own
``max_tokens`` or a stop string, and then leaves its batch.
"""

from __future__ import annotations

from collections.abc import Sequence


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
