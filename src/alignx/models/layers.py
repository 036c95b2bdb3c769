"""A model's decoder layers and its LoRA target modules, found for any architecture."""

from __future__ import annotations

import contextlib
import re

from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn
from transformers.pytorch_utils import Conv1D

from alignx.errors import AlignXError


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks: the longest ModuleList of identically typed modules under the (base) decoder."""
    roots: list[nn.Module] = []
    get_decoder = getattr(model, "get_decoder", None)
    if callable(get_decoder):
        try:
            decoder = get_decoder()
            if isinstance(decoder, nn.Module):
                roots.append(decoder)
        except (AttributeError, NotImplementedError, ValueError):
            pass
    roots.append(model)
    for root in roots:
        best: nn.ModuleList | None = None
        for module in root.modules():
            if isinstance(module, nn.ModuleList) and len(module) > 0:
                if len({type(child) for child in module}) == 1 and (best is None or len(module) > len(best)):
                    best = module
        if best is not None:
            return best
    raise AlignXError(f"cannot find the decoder layers of {type(model).__name__}: no ModuleList of blocks")


_ATTENTION = re.compile(r"attn|attention", re.I)
_MLP = re.compile(r"mlp|feed_forward|ffn", re.I)


def _projection_linears(model: nn.Module) -> list[tuple[str, str, str]]:
    """(name, parent path within the block, kind) of every Linear leaf in the decoder blocks, module order."""
    linear_types: tuple[type, ...] = (nn.Linear,)
    with contextlib.suppress(ImportError):
        linear_types = (nn.Linear, Conv1D)
    found: dict[tuple[str, str], str] = {}
    for block in decoder_layers(model):
        for path, module in block.named_modules():
            if not path or not isinstance(module, linear_types) or any(True for _ in module.children()):
                continue
            parent, _, name = path.rpartition(".")
            kind = "attention" if _ATTENTION.search(parent) else "mlp" if _MLP.search(parent) else "other"
            found.setdefault((name, parent), kind)
    return [(name, parent, kind) for (name, parent), kind in found.items()]


def target_modules(model: nn.Module, targets: str) -> list[str]:
    """LoRA target module names for this model, in module order.

    ``targets``: ``attention-mlp`` (every attention and MLP projection), ``attention``, ``qv`` (query and
    value projections, from peft's per-architecture table, else by name), or comma-separated module names
    that must all exist. Names are last path components (``q_proj``); a name used by both attention and MLP
    (GPT-2's ``c_proj``) is qualified by its parent (``attn.c_proj``) so peft's suffix match is exact.
    """
    linears = _projection_linears(model)
    kinds_by_name: dict[str, set[str]] = {}
    for name, _, kind in linears:
        kinds_by_name.setdefault(name, set()).add(kind)
    entries: list[tuple[str, str]] = []  # (target name, kind)
    for name, parent, kind in linears:
        label = name if len(kinds_by_name[name]) == 1 else f"{parent.rpartition('.')[2]}.{name}"
        if (label, kind) not in entries:
            entries.append((label, kind))
    available = [label for label, _ in entries]
    spec = targets.strip().lower()

    if spec == "attention-mlp":
        chosen = [label for label, kind in entries if kind in ("attention", "mlp")]
    elif spec == "attention":
        chosen = [label for label, kind in entries if kind == "attention"]
    elif spec == "qv":
        attention = [label for label, kind in entries if kind == "attention"]
        chosen = _qv_from_peft(model, attention) or [
            label for label in attention if re.fullmatch(r"(w?q|query|w?v|value)(_proj)?", label.rpartition(".")[2])
        ]
    else:
        wanted = [t.strip() for t in targets.split(",") if t.strip()]
        missing = [t for t in wanted if not any(_same_module(a, t) for a in available)]
        if not wanted or missing:
            raise AlignXError(
                f"lora.targets: {', '.join(missing) or repr(targets)} not found in {type(model).__name__}'s decoder "
                f"layers; available: {', '.join(available)} (or attention-mlp, attention, qv)"
            )
        chosen = [a for a in available if any(_same_module(a, t) for t in wanted)]
    if not chosen:
        raise AlignXError(
            f"lora.targets={targets!r} matches no module of {type(model).__name__}; available: {', '.join(available)}"
        )
    return chosen


def _same_module(available: str, wanted: str) -> bool:
    """``q_proj`` names ``self_attn.q_proj`` and vice versa (peft matches target names as path suffixes)."""
    return available == wanted or available.endswith(f".{wanted}") or wanted.endswith(f".{available}")


def _qv_from_peft(model: nn.Module, attention: list[str]) -> list[str]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    names = set(TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type, []))
    chosen = [label for label in attention if label.rpartition(".")[2] in names]
    return chosen if names and len(chosen) == len(names) else []
