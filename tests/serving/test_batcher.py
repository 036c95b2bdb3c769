"""The batching worker without HTTP: a cancelled request leaves its batch at the next step (the others go on) or
the queue at once; a worker that stops is reported; ``close`` keeps to its timeout."""

from __future__ import annotations

import threading
import time

import pytest

from alignx.serving.batcher import Batcher
from alignx.serving.metrics import Metrics
from alignx.serving.requests import Delta, Failed, Finished, GenerationRequest, Routed, Sampling, Unavailable
from tests.serving.conftest import watch_decode_steps

PROMPTS = ("Give three tips for staying healthy.", "What are the three primary colors?",
           "Answer truthfully: what happens if you eat watermelon seeds?")
OPTIONS = (Sampling(0.0), Sampling(0.9, 0.95, seed=7), Sampling(1.1, seed=3))


class Recorder:
    """A request's events, and a way to wait for its last one."""

    def __init__(self, prompt: str, sampling: Sampling, max_tokens: int = 16, on_event=None):
        self.events: list = []
        self.done = threading.Event()
        self.on_event = on_event
        self.request = GenerationRequest(prompt, 0, max_tokens, sampling, (), self.send)

    def send(self, event) -> None:
        self.events.append(event)
        if self.on_event is not None:
            self.on_event(self, event)
        if isinstance(event, (Finished, Failed)):
            self.done.set()

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events if isinstance(e, Delta))

    @property
    def deltas(self) -> int:
        return sum(isinstance(e, Delta) for e in self.events)


@pytest.fixture()
def engine(aligner):
    engine = Batcher(aligner, Metrics(), max_batch_size=4, wait_ms=300)
    engine.start()
    yield engine
    engine.close()


def solo(aligner, prompt: str, sampling: Sampling) -> str:
    engine = Batcher(aligner, Metrics(), max_batch_size=1, wait_ms=0)
    engine.start()
    recorder = Recorder(prompt, sampling)
    engine.submit(recorder.request)
    assert recorder.done.wait(60)
    engine.close()
    return recorder.text


def test_a_request_cancelled_mid_batch_leaves_at_the_next_step_and_the_others_go_on(aligner, engine):
    alone = [solo(aligner, p, o) for p, o in zip(PROMPTS[1:], OPTIONS[1:])]
    steps, hook = watch_decode_steps(aligner.loaded.model)
    cancelled_after = []

    def leave_after_two_pieces(recorder, event):  # runs in the worker, between two steps: exact timing
        if isinstance(event, Delta) and recorder.deltas == 2:
            cancelled_after.append(len(steps.rows))
            recorder.request.cancel()

    leaving = Recorder(PROMPTS[0], OPTIONS[0], on_event=leave_after_two_pieces)
    staying = [Recorder(p, o) for p, o in zip(PROMPTS[1:], OPTIONS[1:])]
    try:
        for recorder in (leaving, *staying):
            engine.submit(recorder.request)
        assert all(r.done.wait(60) for r in staying)
    finally:
        hook.remove()
    assert [r.text for r in staying] == alone  # the rows that stayed are their answers alone
    assert all(isinstance(r.events[-1], Finished) for r in staying) and not leaving.done.is_set()
    (step,) = cancelled_after
    assert steps.rows[:step] == [3] * step and max(steps.rows[step:]) <= 2  # gone from the very next step
    assert engine.metrics.cancelled_requests.value() == 1 and engine.metrics.wasted_steps.value() == 0


def test_a_waiting_request_whose_client_left_leaves_the_queue_at_once_and_is_never_decoded(aligner):
    engine = Batcher(aligner, Metrics(), max_batch_size=1, wait_ms=0)
    engine.start()
    waiting = Recorder(PROMPTS[1], OPTIONS[1])

    def leave_the_other(_recorder, event):
        if isinstance(event, Routed):  # the first request decodes; the second waits
            assert engine.metrics.queue_depth.value == 1
            waiting.request.cancel()
            assert engine.metrics.queue_depth.value == 0  # withdrawn, not left to be skipped later

    first = Recorder(PROMPTS[0], OPTIONS[0], on_event=leave_the_other)
    engine.submit(first.request)
    engine.submit(waiting.request)
    assert first.done.wait(60)
    engine.close()
    assert waiting.events == [] and engine.metrics.cancelled_requests.value() == 1
    assert engine.metrics.batch_size.snapshot()[1] == 1  # one batch, of one


class _Crash(BaseException):
    """Not an Exception: what a failing batch's handler does not catch, so the worker thread itself stops."""


def test_a_stopped_worker_is_reported_and_fails_what_waits(aligner, monkeypatch):
    engine = Batcher(aligner, Metrics(), max_batch_size=1, wait_ms=0)
    monkeypatch.setattr(aligner, "weights_for", lambda prompts: (_ for _ in ()).throw(_Crash("worker killed")))
    recorder = Recorder(PROMPTS[0], OPTIONS[0])
    assert engine.health() is None
    engine.start()
    engine.submit(recorder.request)
    assert recorder.done.wait(30)
    assert isinstance(recorder.events[-1], Failed) and recorder.events[-1].status == 503
    assert "worker killed" in engine.health()
    with pytest.raises(Unavailable, match="worker has stopped"):
        engine.submit(Recorder(PROMPTS[1], OPTIONS[1]).request)
    engine.close(timeout=5)


def test_close_keeps_to_its_timeout_and_fails_what_it_drops(aligner, monkeypatch):
    engine = Batcher(aligner, Metrics(), max_batch_size=1, wait_ms=0)
    stuck, release = threading.Event(), threading.Event()
    routed = aligner.weights_for

    def a_step_that_hangs(prompts):
        stuck.set()
        release.wait(60)
        return routed(prompts)

    monkeypatch.setattr(aligner, "weights_for", a_step_that_hangs)
    engine.start()
    decoding, waiting = Recorder(PROMPTS[0], OPTIONS[0]), Recorder(PROMPTS[1], OPTIONS[1])
    engine.submit(decoding.request)
    assert stuck.wait(30)
    engine.submit(waiting.request)
    started = time.monotonic()
    engine.close(timeout=0.5)
    assert time.monotonic() - started < 3
    for recorder in (decoding, waiting):
        assert isinstance(recorder.events[-1], Failed) and recorder.events[-1].status == 503
    assert decoding.request.cancelled
    release.set()  # the step ends; the worker drops the cancelled request and stops
    engine._thread.join(30)
    assert not engine._thread.is_alive()
