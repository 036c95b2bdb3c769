"""A prompt's length in tokens, for the server's length check: bounded before it is counted, and counted off the
event loop.

A handler must know how many tokens a prompt takes (chat template included) before it accepts it, and tokenizing
costs time in proportion to the text: a 1 MiB prompt took half a second, during which the event loop served no
stream and no ``/health``. So the handler first bounds the count from the prompt's UTF-8 length, which costs
nothing: no token covers more bytes of text than the longest string in the vocabulary (true of byte-level BPE,
where each vocabulary character stands for one byte, and of SentencePiece, whose pieces are the text itself with
``▁`` for a space), so a prompt longer than ``max_prompt_tokens`` times that many bytes cannot fit and is refused
without tokenizing. A prompt that may fit is tokenized in a worker thread (:func:`asyncio.to_thread`).
"""

from __future__ import annotations

import copy
import threading

from alignx.data.formatting import ChatFormatter


class PromptCounter:
    """Tokenizes prompts as generation feeds them, from any thread, on a copy of the model's tokenizer (the decoding
    thread uses the original: a Rust tokenizer used from two threads at once fails with "Already borrowed")."""

    def __init__(self, tokenizer):
        self._formatter = ChatFormatter(copy.deepcopy(tokenizer))
        self._lock = threading.Lock()
        self.max_token_bytes = max(len(token.encode()) for token in tokenizer.get_vocab())

    def fits(self, prompt: str, max_tokens: int) -> bool:
        """False when ``prompt`` is certainly over ``max_tokens`` tokens, judged by its length alone."""
        return len(prompt.encode()) <= max_tokens * self.max_token_bytes

    def ids(self, prompt: str) -> list[int]:
        """The token ids generation feeds for ``prompt``, chat template included (slow for a long prompt: call it
        off the event loop)."""
        with self._lock:  # the chat template is rendered by the tokenizer too
            text = self._formatter.prompt_text(prompt)
            return self._formatter.tokenizer(text, add_special_tokens=False)["input_ids"]

    def count(self, prompt: str) -> int:
        return len(self.ids(prompt))
