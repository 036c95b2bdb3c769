"""AlignX inside lm-evaluation-harness: the ``alignx`` model, so any lm-eval task runs on a routed model.

Install the extra (``pip install 'alignx[lm-eval]'``) and run lm-eval through AlignX, which registers the model
before handing lm-eval its own command line, untouched (lm-eval finds models only in its registry, not in other
packages)::

    alignx lm-eval --model alignx --model_args run=runs/mine,method=alignx --tasks truthfulqa_mc2
    python -m alignx.eval.lm_harness --model alignx --model_args run=runs/mine --tasks truthfulqa_mc2

lm-eval 0.4.13 also takes the line with its ``run`` subcommand (``alignx lm-eval run --model alignx ...``);
``alignx lm-eval -- --help`` shows lm-eval's own options. In Python, importing this module registers the model:
``lm_eval.simple_evaluate(model="alignx", model_args=...)``.

A run's config names its base model and nothing more (:func:`alignx.models.loading.run_model_config`): a run that
asks to run its model's own code is refused until you add ``trust_remote_code=true`` to ``--model_args`` (lm-eval's
``--trust_remote_code`` adds it too, and also lets the task's data sets run theirs), and ``model=<hub id, directory,
.gguf or smollm2-135m>`` loads the base model from where you say instead of where the run's config says.

Every request is routed on its own context. A few-shot context routes on what is asked: its last block (after
the last blank line, lm-eval's default few-shot delimiter), with a ``Q:``/``A:`` frame removed, so TruthfulQA's
question is routed as ``alignx eval`` routes it (``route=context`` routes the whole context instead). The route's
weights hold for every continuation of that context. ``method=oracle`` is refused: it needs each prompt's gold
axis, which an lm-eval request does not carry. Log-likelihoods use lm-eval's token split
(:func:`alignx.eval.truthfulqa_mc.continuation_scores`) on the raw text with no chat template, as lm-eval's
``hf`` model does; ``generate_until`` decodes greedily from the raw context and cuts at the first stop string.
"""

from __future__ import annotations

import re
import sys
from collections import defaultdict

import torch
from lm_eval.__main__ import cli_evaluate
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm.auto import tqdm

from alignx.errors import AlignXError
from alignx.eval.truthfulqa_mc import continuation_scores
from alignx.generate import ORACLE, AlignX
from alignx.models.precision import autocast

ROUTES = ("last", "context")
_QA_FRAME = re.compile(r"^\s*Q:\s*(?P<question>.*?)\s*(?:\nA:\s*)?$", re.S)


def routing_text(context: str, route: str = "last") -> str:
    """What a request is routed on: the whole context, or its last block without a Q:/A: frame."""
    if route == "context" or not context.strip():
        return context if context.strip() else "(empty)"
    block = context.rstrip().rsplit("\n\n", 1)[-1]
    match = _QA_FRAME.match(block)
    return (match.group("question") if match else block).strip() or block


@register_model("alignx")
class AlignXLM(LM):
    """An AlignX run as an lm-eval model: ``run`` (required), ``method`` (default ``alignx``), ``mode``,
    ``route`` (``last`` or ``context``), ``max_length`` (tokens per window, default 2048), ``model`` and
    ``trust_remote_code`` (as in :meth:`AlignX.from_run`: only these, never the run's config, say where the base
    model comes from and let it run its own code)."""

    def __init__(self, run: str | None = None, method: str = "alignx", mode: str = "router", route: str = "last",
                 max_length: int = 2048, model: str | None = None, trust_remote_code: bool = False,
                 batch_size=None, max_batch_size=None, device=None, **unused):
        super().__init__()
        if not run:
            raise AlignXError("the alignx lm-eval model needs run=<run directory>, e.g. --model_args run=runs/demo")
        if route not in ROUTES:
            raise AlignXError(f"route must be one of {', '.join(ROUTES)}, got {route!r}")
        if method == ORACLE:  # it routes by each prompt's gold axis, and an lm-eval request has none
            raise AlignXError("method=oracle needs each prompt's gold axis, which lm-eval requests do not carry: "
                              "use method=alignx (or expert-<axis> for one expert everywhere); `alignx eval` scores the oracle")
        if not isinstance(trust_remote_code, bool):  # lm-eval turns true/false into booleans; "yes" would be truthy
            raise AlignXError(f"trust_remote_code must be true or false, got {trust_remote_code!r}")
        self.aligner = AlignX.from_run(run, method=method, mode=mode, model=None if model is None else str(model),
                                       trust_remote_code=trust_remote_code)
        self.route, self.max_length = route, int(max_length)
        self.tokenizer = self.aligner.loaded.tokenizer
        self.model = self.aligner.loaded.model

    def _weights(self, context: str):
        weights, _ = self.aligner.weights_for([routing_text(context, self.route)])
        return weights

    def _scored(self, context: str, continuations: list[str]) -> list[tuple[float, bool]]:
        device = next(self.model.parameters()).device
        with self.aligner.experts(self._weights(context)), autocast(self.aligner.precision, device):
            return continuation_scores(self.model, self.tokenizer, context, continuations)

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        by_context: dict[str, list[int]] = defaultdict(list)
        for i, request in enumerate(requests):
            by_context[request.args[0]].append(i)
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        for context, rows in tqdm(by_context.items(), desc="[lm-eval] loglikelihood", unit="context"):
            for i, score in zip(rows, self._scored(context, [requests[i].args[1] for i in rows])):
                out[i] = score
        return out

    def loglikelihood_rolling(self, requests) -> list[float]:
        prefix = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.tokenizer.eos_token_id
        device = next(self.model.parameters()).device
        totals = []
        for request in tqdm(requests, desc="[lm-eval] loglikelihood_rolling", unit="text"):
            text = request.args[0]
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            total = 0.0
            with self.aligner.experts(self._weights(text)), autocast(self.aligner.precision, device), torch.inference_mode():
                for context, target in map(make_disjoint_window, get_rolling_token_windows(ids, prefix, self.max_length, 1)):
                    inputs = torch.tensor([context + target], device=device)
                    logprobs = self.model(input_ids=inputs).logits[0, len(context) - 1 : -1].float().log_softmax(-1)
                    total += float(logprobs.gather(-1, torch.tensor(target, device=device)[:, None]).sum())
            totals.append(total)
        return totals

    def generate_until(self, requests) -> list[str]:
        device = next(self.model.parameters()).device
        answers = []
        for request in tqdm(requests, desc="[lm-eval] generate_until", unit="request"):
            context, options = request.args
            until = options.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            inputs = self.tokenizer(context, return_tensors="pt", add_special_tokens=False).to(device)
            with self.aligner.experts(self._weights(context)), autocast(self.aligner.precision, device), torch.inference_mode():
                output = self.model.generate(**inputs, max_new_tokens=int(options.get("max_gen_toks", 256)), do_sample=False,
                                             pad_token_id=self.tokenizer.pad_token_id, stop_strings=until or None,
                                             tokenizer=self.tokenizer)
            text = self.tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            cuts = [text.index(stop) for stop in until if stop in text]
            answers.append(text[: min(cuts)] if cuts else text)
        return answers


def main(argv: list[str] | None = None) -> None:
    """lm-eval's own command line (``argv``, default ``sys.argv[1:]``), with the ``alignx`` model registered.

    lm-eval reads ``sys.argv`` itself, so it is set for the call and restored after."""
    saved = sys.argv
    sys.argv = [saved[0], *(saved[1:] if argv is None else argv)]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved


if __name__ == "__main__":
    main()
