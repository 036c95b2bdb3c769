"""Baselines of METHOD.md section 4 that need artifacts of their own.

The others are expert-weight choices made at generation time (see :mod:`alignx.generate`): ``base``,
``expert-<axis>``, ``merge-linear``, ``trinityx`` (the global weight vector written by Stage 2) and every
router trained by Stage 2 (``moe-uncalibrated``, ablations). The ones here train or merge one adapter,
stored beside the axis experts as ``experts/<method>/adapter``:

* ``sft-mix`` — one LoRA on all three axes' data (each row with its own axis's injection), trained by the
  Stage 1 machinery with the same budget as the three experts together;
* ``merge-ties`` — the three experts merged by PEFT's TIES (``ties_svd``: trim, elect sign, disjoint merge
  on the full task vectors, then an SVD back to LoRA factors of rank r₁ + r₂ + r₃).
"""

SINGLE_ADAPTER_METHODS = ("sft-mix", "merge-ties")
