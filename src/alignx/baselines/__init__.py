"""Baselines of METHOD.md section 4 that need artifacts of their own.

The others are expert-weight choices made at generation time (see :mod:`alignx.generate`): ``base``,
``expert-<axis>``, ``merge-linear``, ``trinityx`` (the global weight vector written by Stage 2) and every
router trained by Stage 2 (``moe-uncalibrated``, ablations). The ones here train or merge one adapter,
stored beside the axis experts as ``experts/<method>/adapter``:

* ``sft-mix`` — one LoRA on all three axes' data (each row with its own axis's injection), trained by the
  Stage 1 machinery with the same budget as the three experts together;
* ``sft-sequential`` — the authors' stacked scheme: each axis's LoRA trained on top of the earlier ones
  (three adapters ``experts/sft-sequential-<axis>/adapter``, applied together);
* ``merge-ties`` — the three experts merged by PEFT's TIES (``ties_svd``: trim, elect sign, disjoint merge
  on the full task vectors, then an SVD back to LoRA factors of rank r₁ + r₂ + r₃);
* ``moe-dense`` — the H3Fusion/TrinityX-style token-level MoE: three dense expert FFNs per layer (base MLP
  plus each axis's MLP LoRA merged) and a trained top-2 token router per layer; not an adapter but
  ``experts/moe-dense/routers.safetensors`` (see :mod:`alignx.baselines.moe_dense`).
"""

from alignx.baselines.moe_dense import is_trained as moe_dense_trained
from alignx.baselines.sft_sequential import STAGES

ADAPTER_METHODS = ("sft-mix", "sft-sequential", "merge-ties")  # applied as LoRA adapters with weight 1
TRAINED_METHODS = (*ADAPTER_METHODS, "moe-dense")


def is_trained(run, method: str) -> bool:
    """Whether ``run`` (a :class:`alignx.run.RunDir`) holds the finished artifacts of a trained baseline."""
    if method == "moe-dense":
        return moe_dense_trained(run)
    return all(run.has_adapter(a) for a in method_adapters(method))


def method_adapters(method: str) -> tuple[str, ...]:
    """The adapters (names under ``experts/``) an adapter baseline (:data:`ADAPTER_METHODS`) applies, each
    with weight 1."""
    if method == "sft-sequential":
        return STAGES
    return (method,)
