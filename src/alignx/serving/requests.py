"""A completion request on its way through a backend, and the events the backend sends back for it.

Backends decode in their own thread (the Hugging Face batcher) or task (vLLM); every request carries a
thread-safe ``send`` that hands each event to the HTTP handler waiting for it on the event loop. A request
gets ``Routed`` (its expert weights, before the first token), then ``Delta`` pieces of text, then ``Finished``;
or ``Failed`` at any point.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


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


@dataclass
class GenerationRequest:
    prompt: str
    prompt_tokens: int
    max_tokens: int
    sampling: Sampling
    stop: tuple[str, ...]
    send: Callable[[Event], None]
    cancelled: bool = False  # the client went away: a backend drops the request if it has not started it
