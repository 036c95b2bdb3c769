"""One batch of the Hugging Face backend, routed and decoded a step at a time: a row leaves the batch as soon as its
request is done or its client has gone, and the other rows go on.

The batching worker (:mod:`alignx.serving.batcher`) hands :func:`decode_batch` the requests it gathered. They are
routed in one partial prefill, prefilled together (left-padded, as :meth:`alignx.generate.AlignX.generate_with`
pads), and each step then feeds every row the token it sampled last. Before each step, the rows whose request was
cancelled (:meth:`GenerationRequest.cancel`) or is finished (end of sequence, its own ``max_tokens``, a stop string:
:class:`~alignx.serving.streaming.TextTracker`) are cut out of the batch: out of the KV cache, the attention mask
and the per-row expert weights. A client that leaves costs at most the step that was running when it left; the
``alignx_wasted_decode_steps_total`` metric counts any step a row takes after that one (none, by construction).

Each row samples its token with its own temperature, top-p and random generator
(:func:`alignx.generate.sample_token`), so its tokens depend on its own logits and seed only.

**One path through the experts.** A routed batch always takes the mixed-expert layer's low-rank path, whatever its
rows' weights: it is never merged into the base weights, not even for one request. Under bf16 a merged batch rounds
differently from a mixed one, which made a request's answer depend on its batch-mates; and a merge and unmerge cost
as much as a hundred decoded tokens. A fixed-weight method's one vector (an expert, ``merge-linear``, ``trinityx``,
a trained baseline) is merged once for the worker's whole life (:meth:`AlignX.held`), so every batch runs on the
same merged weights.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from dataclasses import dataclass

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

from alignx.generate import sample_token
from alignx.models.precision import autocast
from alignx.serving.metrics import Metrics
from alignx.serving.requests import Delta, Failed, Finished, GenerationRequest, Routed
from alignx.serving.streaming import TextTracker

log = logging.getLogger("alignx.serving")
# transformers 5 renamed a forward's ``past_key_values`` argument and output to ``cache``
_CACHE = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"


@dataclass
class _Row:
    request: GenerationRequest
    tracker: TextTracker
    generator: torch.Generator | None  # None: greedy
    late_steps: int = 0  # steps that began after the request was cancelled

    def next_token(self, logits: torch.Tensor) -> int:
        if self.generator is None:
            return int(logits.argmax())
        return sample_token(logits.cpu(), self.request.sampling.temperature, self.request.sampling.top_p, self.generator)


def decode_batch(aligner, requests: list[GenerationRequest], eos_ids: set[int], metrics: Metrics) -> None:
    """Route and decode ``requests`` together, sending each its events; a failure fails this batch's unfinished
    requests (a 500) and is logged, and the caller goes on with the next batch."""
    rows = [_Row(r, TextTracker(aligner.loaded.tokenizer, r.max_tokens, r.stop, eos_ids), _generator(r)) for r in requests]
    metrics.batch_size.observe(len(rows))
    try:
        weights, explanations = aligner.weights_for([r.prompt for r in requests])
        for i, row in enumerate(rows):
            row.request.send(Routed(aligner.named_weights(weights, i), aligner.method, explanations[i]))
        # a fixed-weight method's vector is merged already (held by the worker): merging it again is a no-op
        with aligner.experts(weights, merge=aligner.fixed is not None):
            _decode(aligner, rows, metrics)
    except Exception:  # our bug or the model's: fail these requests, keep serving
        log.exception("generation failed for a batch of %d request(s)", len(rows))
        for row in rows:
            if not row.tracker.finished and not row.request.cancelled:
                row.request.send(Failed(500, "generation failed: the server logged the error"))
    finally:
        metrics.generated_tokens.inc(sum(len(row.tracker.tokens) for row in rows))
        for row in rows:
            if row.request.cancelled:
                metrics.wasted_steps.inc(max(0, row.late_steps - 1))


@torch.inference_mode()
def _decode(aligner, rows: list[_Row], metrics: Metrics) -> None:
    model, tokenizer, mixture = aligner.loaded.model, aligner.loaded.tokenizer, aligner.mixture
    device = next(model.parameters()).device
    texts = [aligner.formatter.prompt_text(row.request.prompt) for row in rows]
    inputs = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    ids, mask = inputs["input_ids"].to(device), inputs["attention_mask"].to(device)
    positions = mask.long().cumsum(-1) - 1
    positions.masked_fill_(mask == 0, 1)
    cache = None
    with autocast(aligner.precision, device):
        while True:
            keep = [i for i, row in enumerate(rows) if not row.tracker.finished and not row.request.cancelled]
            metrics.cancelled_requests.inc(sum(1 for row in rows if row.request.cancelled and not row.tracker.finished))
            if not keep:
                return
            if len(keep) < len(rows):  # cut the others out of every per-row state
                index = torch.tensor(keep, device=device)
                rows = [rows[i] for i in keep]
                ids, mask, positions = ids[index], mask[index], positions[index]
                if cache is not None:  # None: cut before the prefill
                    cache.batch_select_indices(index)
                if mixture is not None and not mixture.is_merged and mixture.weights is not None and mixture.weights.shape[0] > 1:
                    mixture.set_weights(mixture.weights[index.cpu()])
            started = time.monotonic()
            output = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1,
                           **({} if cache is None else {_CACHE: cache}))
            cache = getattr(output, _CACHE)
            logits = output.logits[:, -1, :].float()
            tokens = []
            for i, row in enumerate(rows):
                if row.request.cancelled_at is not None and row.request.cancelled_at < started:
                    row.late_steps += 1
                tokens.append(row.next_token(logits[i]))
                text = row.tracker.add(tokens[-1])
                if text:
                    row.request.send(Delta(text))
                if row.tracker.finished:
                    row.request.send(Finished(row.tracker.finish_reason, len(row.tracker.tokens)))
            ids = torch.tensor(tokens, device=device)[:, None]
            mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
            positions = positions[:, -1:] + 1


def _generator(request: GenerationRequest) -> torch.Generator | None:
    if request.sampling.temperature == 0:
        return None
    seed = random.randrange(2**31) if request.sampling.seed is None else request.sampling.seed
    return torch.Generator().manual_seed(seed)
