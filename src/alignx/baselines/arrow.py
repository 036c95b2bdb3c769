"""``arrow``: PEFT's training-free Arrow router over the three axis experts, what a PEFT user would pick instead
of MoCaE (Ostapenko et al. 2024; ``peft.ArrowConfig`` / ``create_arrow_model``).

Arrow needs no router training and no feature banks: in every LoRA layer each expert's prototype is the top right
singular vector of its ΔW = B·A, and every *token* is routed by |x·v_e| through a softmax over the top-k
experts (k = 3 here: all of them, so it mixes softly like MoCaE's ``soft`` mode). It therefore mixes per token
and per layer, where MoCaE chooses one weight vector per prompt.

:class:`ArrowShares` reads the weights Arrow gives each expert, so routing benchmarks can score Arrow against
the gold axis like any router: per prompt, the mean over its tokens and over all Arrow layers.

Arrow runs in fp32: under CPU bf16 autocast PEFT's Arrow layer (peft 0.18–0.21) computes its top-k scores in bf16
and scatters them into an fp32 tensor, which raises ``scatter(): Expected self.dtype to be equal to src.dtype``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from peft import ArrowConfig, create_arrow_model
from peft.tuners.lora.arrow import ArrowLoraLinearLayer

from alignx.axes import AXES

ARROW_CONFIG = dict(top_k=len(AXES), router_temperature=1.0, rng_seed=0)  # PEFT's defaults, seeded prototypes


def load_arrow(adapter_dirs: Sequence[Path | str], model):
    """``model`` (the base, already in its storage dtype) with these experts (PEFT adapter directories, in axis
    order) under PEFT's Arrow router."""
    return create_arrow_model(model, [str(d) for d in adapter_dirs], ArrowConfig(**ARROW_CONFIG)).eval()


def arrow_coefficients(layer: ArrowLoraLinearLayer, x: torch.Tensor) -> torch.Tensor:
    """The per-token expert weights ``layer`` mixes with for input ``x`` [..., F] → [..., E]: the softmax over
    the top-k of |x·v_e| / T that :meth:`ArrowLoraLinearLayer.forward` computes (a test checks the two agree)."""
    similarity = (x.to(layer.prototypes.dtype) @ layer.prototypes.T).abs()
    top, index = similarity.topk(layer.top_k, dim=-1)
    scores = torch.full_like(similarity, float("-inf")).scatter(-1, index, top)
    return torch.softmax(scores / layer.temperature, dim=-1)


class ArrowShares:
    """Context that records Arrow's per-token expert weights in every Arrow layer of ``model``.

        with ArrowShares(model) as shares:
            model(**batch)
        per_prompt = shares.per_prompt(batch["attention_mask"])   # [B, E], rows sum to 1
    """

    def __init__(self, model):
        self.layers = [m for m in model.modules() if isinstance(m, ArrowLoraLinearLayer)]
        if not self.layers:
            raise ValueError("the model has no Arrow layers (build it with load_arrow)")
        self.records: list[torch.Tensor] = []
        self.handles = []

    def __enter__(self) -> "ArrowShares":
        def record(layer, args):
            self.records.append(arrow_coefficients(layer, args[0]).float())

        self.records = []
        self.handles = [layer.register_forward_pre_hook(record) for layer in self.layers]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def per_prompt(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """Mean expert weights per prompt over its (unpadded) tokens and every recorded layer: [B, E]."""
        mask = attention_mask.float()[..., None]
        per_layer = [(r * mask).sum(1) / mask.sum(1) for r in self.records]
        return torch.stack(per_layer).mean(0)
