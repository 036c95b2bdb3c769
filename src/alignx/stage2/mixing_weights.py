"""Mixing weights: what the experts are mixed with, made from MoCaE's calibrated routing probabilities.

The probabilities answer "which axis is this prompt?", and they are calibrated for that question: they drive
``--explain``, the routing metrics and the out-of-distribution gate. A mixing weight answers another one: how
much of each frozen expert's update to apply. Each expert was trained at unit scale, and a soft mixture of
calibrated probabilities shrinks every update: at harmless weight 0.8 the harmless expert's refusal can be gone
(docs/method.md, "Mixing weights"; Hard-Routed MoR-LoRA, arXiv 2606.31413; PEFT's Arrow also takes its top-k
before the softmax). So the experts are mixed with weights made from the probabilities p by a transform,
``stage2.mixing``:

* ``soft`` [paper]: w = p;
* ``power``: w ∝ p^γ, renormalised (γ = ``stage2.mixing_power``; γ = 1 is ``soft``, γ → ∞ is ``top1``);
* ``top1``: all weight on the most probable axis (ties: the first).

Then ``stage2.base_axes``: the axes whose expert the mixture replaces by the base model. Their weight is set to
zero and the rest is *not* renormalised, so a prompt routed wholly to such an axis runs on the base model and a
prompt routed partly there keeps that part of the base model's behaviour (an identity expert). That is for an
axis whose expert does not beat the base model by the judges (docs/method.md says which and why).

The out-of-distribution gate's fallback is applied after this, to the rows it flags
(:meth:`~alignx.stage2.mocae.MoCaE.route`).
"""

from __future__ import annotations

import torch

from alignx.config import Stage2Config
from alignx.mixing import apply_mode


def mixing_weights(probabilities: torch.Tensor, config: Stage2Config, axes: list[str]) -> torch.Tensor:
    """The ``[B, E]`` mixing weights of ``[B, E]`` routing probabilities (rows summing to 1), by ``config``."""
    if config.mixing == "top1":
        weights = apply_mode(probabilities, "top1")
    elif config.mixing == "power":
        # in log space: p^γ underflows for small p and large γ, a log-softmax does not
        weights = torch.softmax(config.mixing_power * probabilities.clamp_min(1e-30).log(), dim=-1)
    else:
        weights = probabilities
    if config.base_axes:
        keep = torch.tensor([axis not in config.base_axes for axis in axes], dtype=weights.dtype)
        weights = weights * keep
    return weights
