"""The batching worker of the Hugging Face backend: concurrent requests decoded together.

One background thread owns the model. It waits for a request, keeps collecting for ``wait_ms`` (or until
``max_batch_size``), routes the batch with MoCaE in one partial prefill and decodes it in one ``generate``
call with per-example expert weights and per-example sampling options (temperature, top-p and seed: each
row samples with its own generator, :class:`alignx.generate.PerRowSampler`), so requests with different
options batch together as they do in vLLM. A batch decodes up to its largest ``max_tokens``; each request
ends at its own ``max_tokens``, stop string or end of sequence, and the batch stops as soon as every request
in it has (see :mod:`alignx.serving.streaming`). An exception while decoding fails that batch's unfinished
requests only; the worker goes on with the next batch. :meth:`Batcher.close` drains the queue
before the thread ends.
"""

from __future__ import annotations

import copy
import logging
import queue
import random
import threading
import time

from alignx.data.formatting import ChatFormatter
from alignx.errors import AlignXError
from alignx.generate import RowSampling
from alignx.serving.metrics import Metrics
from alignx.serving.requests import Failed, GenerationRequest, QueueFull, Routed
from alignx.serving.streaming import BatchStreamer

log = logging.getLogger("alignx.serving")
_STOP = object()


class Batcher:
    def __init__(self, aligner, metrics: Metrics, *, max_batch_size: int = 8, wait_ms: float = 10.0,
                 max_queue: int = 256):
        if max_batch_size < 1 or wait_ms < 0 or max_queue < 1:
            raise AlignXError("max batch size and queue size must be >= 1 and the batch wait >= 0 ms")
        self.aligner, self.metrics = aligner, metrics
        self.method = aligner.method
        self.max_batch_size, self.wait_s = max_batch_size, wait_ms / 1000
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._thread = threading.Thread(target=self._loop, name="alignx-batcher", daemon=True)
        tokenizer = aligner.loaded.tokenizer
        # The HTTP handlers count prompt tokens on the event loop while the worker tokenizes batches: a Rust
        # tokenizer used from two threads at once can fail ("Already borrowed"), so the handlers get a copy.
        self._counting = ChatFormatter(copy.deepcopy(tokenizer))
        eos = aligner.loaded.model.generation_config.eos_token_id
        self._eos_ids = {tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])} - {None}

    # ---- called from the event loop -----------------------------------------------------------------
    def count_prompt_tokens(self, prompt: str) -> int:
        text = self._counting.prompt_text(prompt)
        return len(self._counting.tokenizer(text, add_special_tokens=False)["input_ids"])

    def submit(self, request: GenerationRequest) -> None:
        try:
            self._queue.put_nowait(request)
        except queue.Full:
            raise QueueFull from None
        self.metrics.queue_depth.add(1)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Finish every queued request, then stop the worker."""
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join()

    # ---- the worker thread --------------------------------------------------------------------------
    def _loop(self) -> None:
        stopping = False
        while not stopping:
            item = self._queue.get()
            if item is _STOP:
                return
            batch = [item]
            deadline = time.monotonic() + self.wait_s
            while len(batch) < self.max_batch_size:
                try:
                    item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is _STOP:
                    stopping = True
                    break
                batch.append(item)
            self.metrics.queue_depth.add(-len(batch))
            live = [request for request in batch if not request.cancelled]
            if live:
                self._decode(live)

    def _decode(self, group: list[GenerationRequest]) -> None:
        self.metrics.batch_size.observe(len(group))
        streamer = BatchStreamer(group, self.aligner.loaded.tokenizer, self._eos_ids)
        rows = [RowSampling(r.sampling.temperature, r.sampling.top_p,
                            random.randrange(2**31) if r.sampling.seed is None else r.sampling.seed) for r in group]
        try:
            prompts = [r.prompt for r in group]
            weights, explanations = self.aligner.weights_for(prompts)
            for row, request in enumerate(group):
                request.send(Routed(self.aligner.named_weights(weights, row), self.method, explanations[row]))
            self.aligner.generate_with(
                prompts, weights, max_new_tokens=max(r.max_tokens for r in group), rows=rows,
                streamer=streamer, stopping_criteria=streamer.stopping(),
            )
        except Exception:  # our bug or the model's: fail these requests, keep serving
            log.exception("generation failed for a batch of %d request(s)", len(group))
            for request, tracker in zip(group, streamer.trackers):
                if not tracker.finished:
                    request.send(Failed(500, "generation failed: the server logged the error"))
        finally:
            self.metrics.generated_tokens.inc(sum(len(t.tokens) for t in streamer.trackers))
