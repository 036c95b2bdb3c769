"""The mixed-expert LoRA layer: every target layer computes y = W0·x + Σ_a w_a·(α/r)_a·B_a·A_a·x with a
different weight vector w for each example of one batch (METHOD.md §3.6).

Layout. The experts' factors of one layer are stacked once, at attach time:

* ``stacked`` [out + R, in]: the base weight with the experts' A concatenated along the rank dimension
  (R = r_1 + ... + r_E) appended as R extra output rows; the base layer's weight is a view of its first
  ``out`` rows, so the weight is held once (``[in, out + R]`` and its first columns for a GPT-2 Conv1D);
* ``B_t`` [R, out]: the experts' B concatenated the same way, each with its scale (α/r or α/√r) folded in,
  transposed.

One GEMM then yields ``[W0·x | A·x]``. At decode shapes the projections cost what their call and their
weights' streaming cost, not their arithmetic: R more rows to stream add about 1 % to a batch-8 decode step
where a separate x·A product costs a GEMM call of its own (``docs/performance.md``).

Experts of different ranks are concatenated with per-expert offsets, not zero-padded to the largest rank:
padding would spend FLOPs and memory on zeros. Mixing is then one per-example scaling of the rank columns:
the ``[B, E]`` weights are expanded once per ``set_weights`` to ``[B, R]`` column weights (column j belongs
to expert ``expert_of_column[j]``), so the hot path is one GEMM, one broadcast multiply and one small GEMM
accumulated into the base output, with no Python loop over experts or examples::

    [y | h] = x @ stacked.T;   y += (h * column_weights[b]) @ B_t

All wrapped layers of a model read one shared :class:`ExpertWeights` holder; weights ``None`` switches the
experts off (pure base model: what the router's partial prefill needs).

Precision. The factors are stored in the dtype of the base weight (bf16 where generation stores the frozen
projections in bf16 for autocast, else fp32), so the low-rank path runs in the base layer's own precision and
converts nothing per call: under bf16, x·A comes out of the base GEMM rounded to bf16 and the second product
accumulates into the bf16 output. The folded scale·B is computed in fp32 and rounded once. Merged deltas
are computed in fp32 from the stored factors and cast once to the weight's dtype.

Merging. When a whole batch shares one weight vector (a single request), :meth:`MixtureOfExperts.merge`
folds Σ_a w_a·scale_a·B_a·A_a into the base weights once (computed in fp32) and switches the low-rank path
off, so decoding runs at base speed. Unmerging is exact bit for bit (subtracting the delta again would not
be, in floating point), in one of two ways:

* *in place*, when the model's weights files are given (``attach(..., originals=CheckpointWeights)``): the
  merged values overwrite the base weight, and :meth:`MixtureOfExperts.unmerge` reads each original back from
  the file and casts it to the stored dtype, which is how the model got it (``attach`` checks that, bit for
  bit, for every projection, and keeps a SHA-256 digest of each weight: what unmerge reads back must match it,
  so a file changed or deleted since the model was loaded is detected, never silently served). A merged
  request then holds no more than the base model: the original costs a read from disk (the page cache,
  usually) instead of a second copy in memory. Should a read-back fail, unmerge still leaves a consistent,
  unmerged model: that weight is restored by subtracting its delta again (within one rounding of the
  original), merges by copy from then on, and unmerge raises an :class:`AlignXError` naming the file;
* *by copy* otherwise (a model built in memory, a weight that differs from its file): the merged weight is a
  new tensor and the original Parameter is kept aside, which costs one extra copy of the target weights while
  merged.

The LoRA arithmetic itself (factor names, scales) comes from :mod:`alignx.stage1.task_vector`.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from alignx.errors import AlignXError
from alignx.models.checkpoint import CheckpointWeights
from alignx.stage1.task_vector import LoraFactors, adapter_config, lora_factors

MODES: tuple[str, ...] = ("soft", "top1", "threshold")


# ----------------------------------------------------------------------------------------- weight modes


def apply_mode(weights: torch.Tensor, mode: str, floor: float = 0.1) -> torch.Tensor:
    """Post-process routing weights ``[B, E]`` (or ``[E]``) for a generation mode.

    ``soft``: unchanged. ``top1``: one-hot at the argmax (ties: the first expert). ``threshold``: entries
    below ``floor`` are zeroed and each row renormalised to sum 1; a row with every entry below the floor
    keeps only its argmax.
    """
    if mode not in MODES:
        raise AlignXError(f"unknown mixing mode {mode!r}; valid modes: {', '.join(MODES)}")
    if weights.dim() not in (1, 2) or weights.shape[-1] == 0:
        raise AlignXError(f"routing weights must have shape [E] or [B, E], got {list(weights.shape)}")
    if mode == "soft":
        return weights
    one_hot = F.one_hot(weights.argmax(dim=-1), weights.shape[-1]).to(weights.dtype)
    if mode == "top1":
        return one_hot
    if not 0.0 <= float(floor) < 1.0:
        raise AlignXError(f"threshold floor must be in [0, 1), got {floor}")
    kept = torch.where(weights >= floor, weights, torch.zeros_like(weights))
    total = kept.sum(dim=-1, keepdim=True)
    empty = total <= 0
    return torch.where(empty, one_hot, kept / torch.where(empty, torch.ones_like(total), total))


# ------------------------------------------------------------------------------------------ the layer


class ExpertWeights:
    """The per-example expert weights that every :class:`MixedLoRALinear` of one model reads.

    ``weights`` is ``None`` (experts off) or a float32 ``[B, E]`` tensor; a single row applies to the whole
    batch. ``columns`` expands it to rank-column weights, one row per row of a layer's flattened input.
    """

    def __init__(self, ranks: Sequence[int]):
        self.ranks = tuple(int(r) for r in ranks)
        self.num_experts = len(self.ranks)
        self.expert_of_column = torch.repeat_interleave(torch.arange(self.num_experts), torch.tensor(self.ranks))
        self.weights: torch.Tensor | None = None
        self._columns: dict[tuple[int, torch.Size, torch.device, torch.dtype], torch.Tensor] = {}

    def set(self, weights: torch.Tensor | Sequence[float] | None) -> None:
        self._columns = {}
        if weights is None:
            self.weights = None
            return
        weights = torch.as_tensor(weights).detach().to(torch.float32)
        if weights.dim() == 1:
            weights = weights.unsqueeze(0)
        if weights.dim() != 2 or weights.shape[1] != self.num_experts or weights.shape[0] == 0:
            raise AlignXError(
                f"expert weights must have shape [{self.num_experts}] or [batch, {self.num_experts}] "
                f"(one column per expert), got {list(weights.shape)}"
            )
        if not torch.isfinite(weights).all():
            raise AlignXError("expert weights contain NaN or infinite values")
        self.weights = weights

    def columns(self, batch: int, shape: torch.Size, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
        """Column weights of ``shape`` (the ``[..., R]`` rank columns of a batch of ``batch`` examples, each
        example's tokens in a row), or None when the experts are off; cached per shape, device and dtype, so
        each layer's forward does one dictionary lookup and one multiply.

        ``generate`` with ``num_return_sequences``/beams repeats each example k times in a row, so a batch of
        k·B rows uses row i // k of the weights.
        """
        if self.weights is None:
            return None
        key = (batch, shape, device, dtype)
        cols = self._columns.get(key)
        if cols is None:
            cols = self._columns[key] = self._expand(batch, shape).to(device=device, dtype=dtype)
        return cols

    def _expand(self, batch: int, shape: torch.Size) -> torch.Tensor:
        cols = self.weights[:, self.expert_of_column]  # [B or 1, R]
        held = cols.shape[0]
        if held != 1 and held != batch:
            if batch % held:
                raise AlignXError(f"expert weights hold {held} rows but the batch has {batch} examples")
            cols = cols.repeat_interleave(batch // held, dim=0)
        rows = shape.numel() // shape[-1]
        return cols.expand(batch, -1).repeat_interleave(rows // batch, dim=0).view(shape).contiguous()


def _features(module: nn.Module) -> tuple[int, int, bool]:
    """(in_features, out_features, weight is [in, out]) of an nn.Linear or a GPT-2 style Conv1D."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, False
    with contextlib.suppress(ImportError):
        if isinstance(module, Conv1D):
            return module.weight.shape[0], module.weight.shape[1], True
    raise TypeError(f"{type(module).__name__} is not a linear layer")


class MixedLoRALinear(nn.Module):
    """A frozen base linear layer plus E stacked LoRA experts, mixed per example by a shared holder.

    ``factors`` are the experts' factors of this layer, in expert order, with ranks ``holder.ranks``;
    ``original`` reads the base weight back from its checkpoint (merges are then in place), or is None.

    The experts' A factors are stored as R extra output rows of the base weight (``stacked``: ``[out + R, in]``,
    or ``[in, out + R]`` for a Conv1D), and the base layer's weight is a view of its first rows, so one GEMM
    yields both the base output and x·A, and the weight is not held twice (see the module docstring).
    """

    def __init__(self, base: nn.Module, factors: Sequence[LoraFactors], holder: ExpertWeights,
                 original: Callable[[], torch.Tensor] | None = None):
        super().__init__()
        in_features, out_features, self._transposed = _features(base)
        ranks = tuple(f.A.shape[0] for f in factors)
        if ranks != holder.ranks:
            raise ValueError(f"factor ranks {ranks} differ from the holder's {holder.ranks}")
        for f in factors:
            if f.A.shape[1] != in_features or f.B.shape != (out_features, f.A.shape[0]):
                raise ValueError(
                    f"factors A {list(f.A.shape)}, B {list(f.B.shape)} do not fit {in_features} -> {out_features}"
                )
        self.base = base.requires_grad_(False)
        self.holder = holder
        self.out_features = out_features
        weight = base.weight.detach()
        A = torch.cat([f.A.float() for f in factors], dim=0)  # [R, in]
        B_t = torch.cat([f.scale * f.B.float() for f in factors], dim=1).T  # [R, out], scale folded in, in fp32
        rows = A.to(device=weight.device, dtype=weight.dtype)
        stacked = torch.cat([weight, rows.T], dim=1) if self._transposed else torch.cat([weight, rows], dim=0)
        self.register_buffer("stacked", stacked, persistent=False)
        self.register_buffer("B_t", B_t.to(device=weight.device, dtype=weight.dtype).contiguous(), persistent=False)
        bias = getattr(base, "bias", None)
        self.register_buffer("stacked_bias", None if bias is None else torch.cat(
            [bias.detach(), bias.new_zeros(A.shape[0])]), persistent=False)
        self.relink()
        self._original = original
        self._original_weight: nn.Parameter | None = None  # set while merged by copy
        self._merged_in_place = False
        self._merged_columns: torch.Tensor | None = None  # the column weights merged in place

    def relink(self) -> None:
        """Make the base weight the view of ``stacked``'s first rows again, if something made them two tensors
        (``module.to``, a clone): the base weight is the truth, and the separate copy is dropped."""
        weight = self.base.weight
        if weight.data_ptr() == self.stacked.data_ptr():  # a view of the first rows (columns) starts where it does
            return
        if self.stacked.dtype != weight.dtype or self.stacked.device != weight.device:
            self.stacked = self.stacked.to(device=weight.device, dtype=weight.dtype)
            self.B_t = self.B_t.to(device=weight.device, dtype=weight.dtype)
        view = self.stacked[:, : self.out_features] if self._transposed else self.stacked[: self.out_features]
        view.copy_(weight.detach())
        self.base.weight = nn.Parameter(view, requires_grad=False)

    @property
    def A(self) -> torch.Tensor:
        """The experts' A factors, stacked: ``[R, in]`` (a view of ``stacked``)."""
        return self.stacked[:, self.out_features:].T if self._transposed else self.stacked[self.out_features:]

    @property
    def merged(self) -> bool:
        return self._merged_in_place or self._original_weight is not None

    @property
    def merges_in_place(self) -> bool:
        return self._original is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or self.holder.weights is None:
            return self.base(x)
        self.relink()
        return self.add_low_rank(self.project(x), x.shape[0] if x.dim() > 1 else 1)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """``[W0·x | A·x]`` (``[..., out + R]``) in one GEMM: the base output and the R rank columns (a few % more
        weight rows to stream, where a separate x·A product would cost a GEMM call of its own)."""
        if not self._transposed:
            return F.linear(x, self.stacked, self.stacked_bias)
        flat = x.reshape(-1, x.shape[-1])  # Conv1D: out = bias + x @ W, W [in, out]
        full = torch.mm(flat, self.stacked) if self.stacked_bias is None else torch.addmm(self.stacked_bias, flat, self.stacked)
        return full.view(*x.shape[:-1], -1)

    def add_low_rank(self, full: torch.Tensor, batch: int) -> torch.Tensor:
        """The base output of :meth:`project`'s ``full`` plus each example's mixed low-rank delta,
        ``(h·diag(w_b)) @ B_t`` with ``h`` the rank columns, accumulated in place (one kernel) into the base
        output, which is returned (a view of ``full``). At decode shapes each operation here costs its call, not
        its arithmetic (and a Python-level view or slice a microsecond), so there are as few as it needs."""
        flat, out_features = full.view(-1, full.shape[-1]), self.out_features
        h = flat.narrow(1, out_features, flat.shape[1] - out_features)
        B_t = self.B_t
        flat.narrow(1, 0, out_features).addmm_(h * self.holder.columns(batch, h.shape, full.device, full.dtype),
                                               B_t if B_t.dtype == full.dtype else B_t.to(full.dtype))
        return full.narrow(-1, 0, out_features)

    def delta(self, column_weights: torch.Tensor) -> torch.Tensor:
        """Σ_a w_a·scale_a·B_a·A_a in fp32, laid out like the base weight; ``column_weights``: ``[R]``."""
        scaled = self.A.float().T * column_weights.to(self.stacked.device, torch.float32)  # [in, R]
        delta = scaled @ self.B_t.float()  # [in, out]
        return delta if self._transposed else delta.T

    def merge(self, column_weights: torch.Tensor) -> None:
        """Make the base weight W0 + delta: in place where the original can be read back, else as a new
        tensor with the original Parameter kept aside."""
        if self.merged:
            self.unmerge()
        self.relink()
        weight = self.base.weight
        if self._original is None:
            self._original_weight = weight
            merged = (weight.detach().float() + self.delta(column_weights)).to(weight.dtype)
            self.base.weight = nn.Parameter(merged, requires_grad=False)
            return
        if weight.dtype == torch.float32:  # W += (A·diag(w)·B) laid out like W, with no [out, in] temporary
            scaled = self.A.T * column_weights.to(weight.device, torch.float32)  # [in, R]
            weight.data.addmm_(*((scaled, self.B_t) if self._transposed else (self.B_t.T, scaled.T)))
        else:  # computed in fp32, rounded once into the stored dtype (an in-place add: one fp32 temporary, the delta)
            weight.data.add_(self.delta(column_weights))
        self._merged_in_place, self._merged_columns = True, column_weights

    def unmerge(self) -> None:
        """Restore the original weight, bit for bit the weight before :meth:`merge`. If an in-place merge's
        original cannot be read back as it was (its file changed or is gone), the weight is restored by subtracting
        the delta again, within one rounding of the original, later merges are by copy, and AlignXError says why."""
        if self._merged_in_place:
            weight = self.base.weight
            try:
                original = self._original()
            except AlignXError:
                weight.data.sub_(self.delta(self._merged_columns))
                self._original = None
                raise
            finally:
                self._merged_in_place, self._merged_columns = False, None
            weight.data.copy_(original.to(device=weight.device, dtype=weight.dtype))
        elif self._original_weight is not None:
            self.base.weight = self._original_weight
            self._original_weight = None

    def extra_repr(self) -> str:
        return (f"experts={self.holder.num_experts}, ranks={self.holder.ranks}, merged={self.merged}, "
                f"in_place={self.merges_in_place}")


# --------------------------------------------------------------------------------------- the mixture


class MixtureOfExperts:
    """E LoRA experts attached to a causal LM, mixed with per-example weights.

    Create with :meth:`attach`; weights are ``[B, E]`` or ``[E]`` in ``experts`` order, ``None`` = base model.
    """

    def __init__(self, model: nn.Module, experts: tuple[str, ...], layers: dict[str, MixedLoRALinear],
                 holder: ExpertWeights):
        self.model = model
        self.experts = experts
        self.layers = layers
        self.holder = holder
        self.merged_weights: torch.Tensor | None = None

    @property
    def ranks(self) -> tuple[int, ...]:
        return self.holder.ranks

    @property
    def is_merged(self) -> bool:
        return self.merged_weights is not None

    @classmethod
    def attach(cls, model: nn.Module, adapter_dirs: Mapping[str, Path | str], axes_order: Sequence[str],
               originals: CheckpointWeights | None = None) -> MixtureOfExperts:
        """Wrap every module the adapters target in a :class:`MixedLoRALinear`; experts in ``axes_order``.

        With ``originals`` (the files ``model`` was loaded from), a projection whose weight is its file's tensor
        cast to the weight's dtype, bit for bit, merges in place (see the module docstring); others by copy.
        """
        experts = tuple(axes_order)
        missing = [a for a in experts if a not in adapter_dirs]
        extra = sorted(set(adapter_dirs) - set(experts))
        if not experts or missing or extra or len(set(experts)) != len(experts):
            raise AlignXError(
                f"experts {', '.join(experts) or '(none)'} do not match the adapters given "
                f"({', '.join(adapter_dirs) or 'none'})"
                + (f": no adapter for {', '.join(missing)}" if missing else "")
                + (f": adapters {', '.join(extra)} are not in the expert order" if extra else "")
            )
        factors = {a: _expert_factors(a, Path(adapter_dirs[a])) for a in experts}

        submodules = dict(model.named_modules())
        for a in experts:
            absent = [m for m in factors[a] if m not in submodules]
            if absent:
                raise AlignXError(
                    f"expert {a} ({adapter_dirs[a]}) targets modules {_names(absent)} that the base model "
                    f"({type(model).__name__}) does not have: was it trained on another base model?"
                )
        modules = list(factors[experts[0]])
        for a in experts[1:]:
            if set(factors[a]) != set(modules):
                only_a = sorted(set(factors[a]) - set(modules))
                only_first = sorted(set(modules) - set(factors[a]))
                raise AlignXError(
                    f"experts {experts[0]} and {a} target different modules"
                    + (f"; only {a} targets {_names(only_a)}" if only_a else "")
                    + (f"; only {experts[0]} targets {_names(only_first)}" if only_first else "")
                    + ": train every expert with the same lora.targets"
                )

        for m in modules:
            module = submodules[m]
            if isinstance(module, MixedLoRALinear):
                raise AlignXError(f"module {m} already has experts attached: detach() the other mixture first")
            try:
                in_features, out_features, _ = _features(module)
            except TypeError:
                raise AlignXError(f"module {m} is a {type(module).__name__}, not a linear layer; "
                                  "AlignX experts must target linear projections") from None
            for a in experts:
                f = factors[a][m]
                if f.A.shape[1] != in_features or f.B.shape[0] != out_features:
                    raise AlignXError(
                        f"rank/shape mismatch: expert {a} ({adapter_dirs[a]}) module {m} maps "
                        f"{f.A.shape[1]} -> {f.B.shape[0]} features but the base layer maps "
                        f"{in_features} -> {out_features}: was it trained on another base model?"
                    )

        holder = ExpertWeights([next(iter(factors[a].values())).A.shape[0] for a in experts])
        layers: dict[str, MixedLoRALinear] = {}
        for m in modules:
            original = _checkpoint_reader(originals, f"{m}.weight", submodules[m].weight)
            layer = MixedLoRALinear(submodules[m], [factors[a][m] for a in experts], holder, original)
            _replace(model, m, layer)
            layers[m] = layer
        return cls(model, experts, layers, holder)

    # --- weights

    def set_weights(self, weights: torch.Tensor | Sequence[float] | None) -> None:
        """Per-example weights ``[B, E]`` (or ``[E]`` for the whole batch); None switches the experts off."""
        if self.is_merged:
            raise RuntimeError("the experts are merged into the base weights: unmerge() before set_weights()")
        self.holder.set(weights)

    @property
    def weights(self) -> torch.Tensor | None:
        return self.holder.weights

    @contextlib.contextmanager
    def using(self, weights: torch.Tensor | Sequence[float] | None) -> Iterator[MixtureOfExperts]:
        """Run a block with these weights, then restore the previous ones."""
        previous = self.holder.weights
        self.set_weights(weights)
        try:
            yield self
        finally:
            self.holder.set(previous)

    # --- merging

    def _vector(self, weights: torch.Tensor | Sequence[float]) -> torch.Tensor:
        """``weights`` as the one fp32 vector ``[E]`` a merge takes."""
        vector = torch.as_tensor(weights).detach().to(torch.float32)
        if vector.dim() == 2 and vector.shape[0] == 1:
            vector = vector[0]
        if vector.dim() != 1 or vector.shape[0] != len(self.experts):
            raise AlignXError(
                f"merge() takes one weight vector of shape [{len(self.experts)}] shared by the whole batch, "
                f"got {list(vector.shape)}; per-example weights need set_weights()"
            )
        if not torch.isfinite(vector).all():
            raise AlignXError("expert weights contain NaN or infinite values")
        return vector

    def merge(self, weights: torch.Tensor | Sequence[float]) -> None:
        """Fold Σ_a w_a·scale_a·B_a·A_a into the base weights (one vector ``[E]`` for the whole batch)."""
        vector = self._vector(weights)
        if self.is_merged:
            self.unmerge()
        columns = vector[self.holder.expert_of_column]
        for layer in self.layers.values():
            layer.merge(columns)
        self.merged_weights = vector

    def unmerge(self) -> None:
        """Restore the exact original base weights and the low-rank path. Every layer is unmerged even when one
        cannot read its original back (see :meth:`MixedLoRALinear.unmerge`); then AlignXError says which."""
        failures = []
        for layer in self.layers.values():
            try:
                layer.unmerge()
            except AlignXError as exc:
                failures.append(str(exc))
        self.merged_weights = None
        if failures:
            raise AlignXError(f"{failures[0]}; {len(failures)} weight(s) were restored by subtracting the experts "
                              "again, within one rounding of the originals (reload the model for the exact weights)")

    @contextlib.contextmanager
    def merged(self, weights: torch.Tensor | Sequence[float]) -> Iterator[MixtureOfExperts]:
        """Run a block with ``weights`` merged into the base weights, then restore what was merged before
        (nothing, or an enclosing block's weights). Inside a block already merged with these very weights it
        merges nothing: a pass that holds one vector for all its batches merges it once, not once per batch."""
        vector, previous = self._vector(weights), self.merged_weights
        if previous is not None and torch.equal(previous, vector):
            yield self
            return
        self.merge(vector)
        try:
            yield self
        finally:
            if previous is None:
                self.unmerge()
            else:
                self.merge(previous)

    def detach(self) -> nn.Module:
        """Unmerge and put the original base modules back; returns the model."""
        self.unmerge()
        for name, layer in self.layers.items():
            _replace(self.model, name, layer.base)
        self.layers = {}
        self.holder.set(None)
        return self.model


def _expert_factors(expert: str, adapter_dir: Path) -> dict[str, LoraFactors]:
    """The expert's factors, refusing adapter variants whose arithmetic is not scale·B·A."""
    config = adapter_config(adapter_dir)
    if config.get("use_dora"):
        raise AlignXError(f"expert {expert} ({adapter_dir}) is a DoRA adapter; AlignX mixes plain LoRA experts")
    if config.get("lora_bias"):
        raise AlignXError(f"expert {expert} ({adapter_dir}) has lora_bias=true; AlignX mixes plain LoRA experts")
    factors = lora_factors(adapter_dir)
    ranks = {f.A.shape[0] for f in factors.values()}
    bad = [m for m, f in factors.items() if f.B.shape[1] != f.A.shape[0]]
    if len(ranks) != 1 or bad:
        raise AlignXError(
            f"rank/shape mismatch in expert {expert} ({adapter_dir}): "
            + (f"lora_A and lora_B ranks differ in {_names(bad)}" if bad else
               f"its modules have different ranks {sorted(ranks)}; one rank per expert is supported")
        )
    return factors


def _checkpoint_reader(originals: CheckpointWeights | None, key: str,
                       weight: torch.Tensor) -> Callable[[], torch.Tensor] | None:
    """A function that reads ``weight`` back from ``originals``, if the file's ``key`` cast to the weight's dtype
    is the weight bit for bit now; else None. What it reads must match the weight's digest taken now: a file
    changed or deleted since is an AlignXError, not a different weight."""
    if originals is None or key not in originals:
        return None
    stored = originals.tensor(key)
    if stored.shape != weight.shape or not torch.equal(stored.to(weight.device, weight.dtype), weight.detach()):
        return None
    shape, device, dtype, digest = weight.shape, weight.device, weight.dtype, _digest(weight)
    path = originals.files[key]

    def read() -> torch.Tensor:
        try:
            tensor = originals.tensor(key).to(device, dtype)
        except Exception as exc:  # the file is gone, truncated, rewritten without this tensor...
            raise AlignXError(f"cannot read {key} back from {path} to unmerge the experts: {exc}") from exc
        if tensor.shape != shape or _digest(tensor) != digest:
            raise AlignXError(f"{path} has changed since the model was loaded: its {key} is not the weight the model "
                              "was loaded with, so the experts cannot be unmerged exactly")
        return tensor

    return read


def _digest(tensor: torch.Tensor) -> bytes:
    """SHA-256 of a tensor's bytes (about 0.1 s for SmolLM2-135M's projections)."""
    return hashlib.sha256(tensor.detach().contiguous().cpu().view(torch.uint8).numpy()).digest()


def _names(modules: Sequence[str], limit: int = 4) -> str:
    shown = ", ".join(modules[:limit])
    return shown + (f" and {len(modules) - limit} more" if len(modules) > limit else "")


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
