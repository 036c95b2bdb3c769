"""Precision: the autocast dtype per setting, and frozen weights stored in it."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny_model

from alignx.config import ModelConfig
from alignx.errors import AlignXError
from alignx.models.precision import autocast, autocast_dtype, resolve_precision, store_frozen_linears_in


def test_precision():
    assert resolve_precision("fp32", "cpu") is None
    assert resolve_precision("bf16", "cpu") == torch.bfloat16
    native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert resolve_precision("auto", "cpu") == (torch.bfloat16 if native else None)
    assert autocast_dtype(ModelConfig(precision="fp32"), torch.device("cpu")) is None
    with pytest.raises(AlignXError):
        resolve_precision("fp16", "cpu")

    x = torch.randn(4, 4)
    with autocast(ModelConfig(precision="fp32"), "cpu"):
        assert not torch.is_autocast_enabled("cpu") and (x @ x).dtype == torch.float32
    with autocast(torch.bfloat16, "cpu"):
        assert (x @ x).dtype == torch.bfloat16
    with autocast(None, "cpu"):
        assert (x @ x).dtype == torch.float32


def test_generation_stores_the_tied_lm_head_in_bf16_with_identical_logits():
    model = build_tiny_model("llama", 97).eval().requires_grad_(False)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode(), autocast(torch.bfloat16, "cpu"):
        before = model(ids).logits
    embeddings = model.get_input_embeddings().weight
    store_frozen_linears_in(model, torch.bfloat16, output_projection=True)
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert model.get_input_embeddings().weight is embeddings and embeddings.dtype == torch.float32  # untied, kept
    with torch.inference_mode(), autocast(torch.bfloat16, "cpu"):
        assert torch.equal(model(ids).logits, before)  # the cast autocast did on every forward, done once
