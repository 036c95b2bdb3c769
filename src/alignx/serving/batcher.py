"""The batching worker of the Hugging Face backend: concurrent requests decoded together.

One background thread owns the model. It waits for a request, keeps collecting for ``wait_ms`` (or until
``max_batch_size``) and hands the batch to :func:`alignx.serving.decoding.decode_batch`, which routes it with MoCaE
in one partial prefill and decodes it a step at a time with per-example expert weights and per-example sampling
options, so requests with different options batch together as they do in vLLM. A request whose client goes away
while it waits leaves the queue at once; one whose client goes away while it decodes leaves its batch before the
next step. An exception while decoding fails that batch's unfinished requests only; the worker goes on with the
next batch.

If the worker thread itself ever stops (an error outside a batch), :meth:`Batcher.health` says why, so ``/health``
fails, new requests get a 503 and the waiting ones are failed with a 503 too. :meth:`Batcher.close` finishes the
waiting requests, within ``--shutdown-timeout`` when one is set: after it, it fails and cancels whatever is left
and returns.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

from alignx.errors import AlignXError
from alignx.serving.decoding import decode_batch
from alignx.serving.metrics import Metrics
from alignx.serving.requests import Failed, GenerationRequest, QueueFull, Unavailable
from alignx.serving.tokens import PromptCounter

log = logging.getLogger("alignx.serving")


class Batcher:
    def __init__(self, aligner, metrics: Metrics, *, max_batch_size: int = 8, wait_ms: float = 10.0,
                 max_queue: int = 256):
        if max_batch_size < 1 or wait_ms < 0 or max_queue < 1:
            raise AlignXError("max batch size and queue size must be >= 1 and the batch wait >= 0 ms")
        self.aligner, self.metrics = aligner, metrics
        self.method = aligner.method
        self.max_batch_size, self.wait_s, self.max_queue = max_batch_size, wait_ms / 1000, max_queue
        self.prompts = PromptCounter(aligner.loaded.tokenizer)
        eos = aligner.loaded.model.generation_config.eos_token_id
        self._eos_ids = {aligner.loaded.tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])} - {None}
        self._waiting: deque[GenerationRequest] = deque()
        self._changed = threading.Condition()  # guards _waiting and _closing; notified when either changes
        self._closing = False
        self._running: list[GenerationRequest] = []  # the batch being decoded
        self._failure: str | None = None  # why the worker stopped, if it did
        self._thread = threading.Thread(target=self._loop, name="alignx-batcher", daemon=True)

    # ---- called from the event loop -----------------------------------------------------------------
    def submit(self, request: GenerationRequest) -> None:
        with self._changed:
            problem = self.health()
            if problem is not None:
                raise Unavailable(problem)
            if len(self._waiting) >= self.max_queue:
                raise QueueFull
            self._waiting.append(request)
            self.metrics.queue_depth.add(1)
            self._changed.notify_all()
        request.on_cancel(lambda: self._withdraw(request))

    def health(self) -> str | None:
        """None while the worker serves; otherwise why it does not."""
        if self._failure is not None:
            return self._failure
        if self._closing:
            return "the server is shutting down"
        if self._thread.ident is not None and not self._thread.is_alive():
            return "the decoding worker has stopped"
        return None

    def start(self) -> None:
        self._thread.start()

    def close(self, timeout: float | None = None) -> None:
        """Finish every waiting request, then stop the worker; after ``timeout`` seconds (None: no limit), fail and
        cancel the requests still waiting or decoding and return (the worker is a daemon thread)."""
        with self._changed:
            self._closing = True
            self._changed.notify_all()
        if self._thread.ident is None:
            return
        self._thread.join(timeout)
        if self._thread.is_alive():
            dropped = self._fail_waiting("the server shut down before this request was decoded")
            for request in self._running:
                request.send(Failed(503, "the server shut down before this request finished"))
                request.cancel()
            log.warning("the decoding worker did not finish within the shutdown timeout of %s s: dropped %d waiting "
                        "and %d decoding request(s)", timeout, dropped, len(self._running))

    # ---- the worker thread --------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            with self.aligner.held():  # a fixed-weight method's one vector, merged for the worker's whole life
                while (batch := self._gather()) is not None:
                    self._running = batch
                    decode_batch(self.aligner, batch, self._eos_ids, self.metrics)
                    self._running = batch = []  # nothing of a finished batch outlives it while the worker waits
        except BaseException as exc:  # whatever stopped the worker, /health must say so
            self._failure = f"the decoding worker has stopped: {type(exc).__name__}: {exc}"
            log.exception("the decoding worker has stopped")
            for request in self._running:
                request.send(Failed(503, self._failure))
            self._fail_waiting(self._failure)

    def _gather(self) -> list[GenerationRequest] | None:
        """The next batch: the first waiting request and whatever arrives within ``wait_ms`` (nothing more while
        closing), up to ``max_batch_size``; None once closing with nothing left."""
        with self._changed:
            while True:
                while not self._waiting and not self._closing:
                    self._changed.wait()
                if not self._waiting:
                    return None
                deadline = time.monotonic() + self.wait_s
                while self._waiting and len(self._waiting) < self.max_batch_size and not self._closing:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._changed.wait(remaining)
                batch = [self._waiting.popleft() for _ in range(min(self.max_batch_size, len(self._waiting)))]
                if batch:  # empty when every request gathered was withdrawn meanwhile
                    self.metrics.queue_depth.add(-len(batch))
                    return batch

    def _withdraw(self, request: GenerationRequest) -> None:
        """A waiting request whose client went away leaves the queue (one already in a batch leaves that batch)."""
        with self._changed:
            try:
                self._waiting.remove(request)  # GenerationRequest compares by identity
            except ValueError:
                return
            self.metrics.queue_depth.add(-1)
            self.metrics.cancelled_requests.inc()

    def _fail_waiting(self, message: str) -> int:
        with self._changed:
            waiting = list(self._waiting)
            self._waiting.clear()
            self.metrics.queue_depth.add(-len(waiting))
        for request in waiting:
            request.send(Failed(503, message))
        return len(waiting)
