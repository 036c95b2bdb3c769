"""Precision: when bf16 autocast runs natively, and the frozen weights stored in its dtype."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from alignx.config import ModelConfig
from alignx.errors import AlignXError
from alignx.models.layers import decoder_layers


def bf16_supported(device: str | torch.device) -> bool:
    """Whether bf16 autocast runs natively: CUDA with bf16, or a CPU with AVX512_BF16/AMX (oneDNN's check)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
        try:
            return bool(check()) if check is not None else False
        except RuntimeError:
            return False
    return False


def resolve_precision(precision: str, device: str | torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device``: torch.bfloat16, or None for plain fp32."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        dev = torch.device(device)
        if dev.type == "cuda" and not bf16_supported(dev):
            raise AlignXError("model.precision=bf16 but this GPU has no bf16 support: use model.precision=fp32 or auto")
        return torch.bfloat16
    if precision == "auto":
        return torch.bfloat16 if bf16_supported(device) else None
    raise AlignXError(f"model.precision must be one of auto, bf16, fp32, got {precision!r}")


def autocast_dtype(config: ModelConfig, device: str | torch.device) -> torch.dtype | None:
    return resolve_precision(config.precision, device)


def store_frozen_linears_in(model: nn.Module, dtype: torch.dtype, *, output_projection: bool = False) -> None:
    """Keep the frozen decoder projections (and, with ``output_projection``, the LM head) in the autocast dtype.

    Autocast only caches casts of weights that require grad, so frozen fp32 weights are re-cast to bf16
    in every forward (and backward): ~18% of a SmolLM2 training step on CPU, and a good share of every
    decoded token. Storing them in bf16 gives bit-identical matmuls under autocast; norms and embeddings
    stay fp32. Used by Stage 1 training and by generation.

    The LM head is the biggest of these casts at decode time (SmolLM2: 49,152 × 576, re-cast on every
    token: a third of a batch-8 decode step on CPU). Generation stores it in bf16 too; when it is tied to
    the input embeddings it gets its own bf16 copy and the embeddings keep their fp32 weight, so the memory
    it adds is the per-token cast it saves.
    """
    for module in decoder_layers(model).modules():
        if isinstance(module, nn.Linear):
            module.to(dtype)
    head = model.get_output_embeddings() if output_projection else None
    if isinstance(head, nn.Linear) and not head.weight.requires_grad and head.weight.dtype != dtype:
        head.weight = nn.Parameter(head.weight.detach().to(dtype), requires_grad=False)


@contextlib.contextmanager
def autocast(config_or_dtype: ModelConfig | torch.dtype | None, device: str | torch.device) -> Iterator[None]:
    """bf16 autocast on ``device`` per the config (or an explicit dtype); a no-op for fp32/None."""
    if isinstance(config_or_dtype, ModelConfig):
        dtype = autocast_dtype(config_or_dtype, device)
    else:
        dtype = config_or_dtype
    if dtype is None or dtype == torch.float32:
        yield
        return
    with torch.autocast(device_type=torch.device(device).type, dtype=dtype):
        yield
