"""A completion request on its way through a backend, and the events the backend sends back for it.

Backends decode in their own thread (the Hugging Face batcher) or task (vLLM); every request carries a
thread-safe ``send`` that hands each event to the HTTP handler waiting for it on the event loop. A request
gets ``Routed`` (its expert weights, before the first token), then ``Delta`` pieces of text, then ``Finished``;
or ``Failed`` at any point.

A request whose client has gone is :meth:`GenerationRequest.cancel`-led by the HTTP handler: a backend drops it
from its queue, and from a running batch before that batch's next step (the vLLM backend aborts it in its engine).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0  # 0: greedy decoding
    top_p: float = 1.0
    seed: int | None = None


@dataclass(frozen=True)
class Routed:
    weights: dict[str, float] | None  # final per-expert weights; None for the base model
    method: str
    explanation: dict


@dataclass(frozen=True)
class Delta:
    text: str


@dataclass(frozen=True)
class Finished:
    finish_reason: str  # "stop" (end of sequence or a stop string) or "length" (max_tokens)
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    status: int
    message: str


Event = Routed | Delta | Finished | Failed


class QueueFull(Exception):
    """More requests are waiting than the server accepts (HTTP 503)."""


class Unavailable(Exception):
    """The backend cannot serve now (HTTP 503); the message says why (its worker stopped, it is shutting down)."""


@dataclass(eq=False)  # requests compare by identity: a queue removes exactly the one that was cancelled
class GenerationRequest:
    prompt: str
    prompt_tokens: int
    max_tokens: int
    sampling: Sampling
    stop: tuple[str, ...]
    send: Callable[[Event], None]
    cancelled_at: float | None = None  # time.monotonic() when the client went away; None while it waits
    _on_cancel: list[Callable[[], None]] = field(default_factory=list, repr=False)

    @property
    def cancelled(self) -> bool:
        return self.cancelled_at is not None

    def cancel(self) -> None:
        """The client has gone: stop spending anything on this request. Idempotent; the callbacks run in the
        caller's thread (the HTTP handlers call it on the event loop)."""
        if self.cancelled_at is None:
            self.cancelled_at = time.monotonic()
            for callback in self._on_cancel:
                callback()

    def on_cancel(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` when the request is cancelled, now if it already is."""
        self._on_cancel.append(callback)
        if self.cancelled:
            callback()
