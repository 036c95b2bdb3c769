"""Decoder layers and LoRA target modules per architecture."""

from __future__ import annotations

import pytest
from conftest import ARCHITECTURES, build_tiny_model

from alignx.errors import AlignXError
from alignx.models.layers import decoder_layers, target_modules

SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_target_modules_per_architecture(arch):
    model = build_tiny_model(arch, vocab_size=64, num_layers=2)
    assert len(decoder_layers(model)) == 2
    assert target_modules(model, "attention-mlp") == SEVEN
    assert target_modules(model, "attention") == SEVEN[:4]
    assert target_modules(model, "qv") == ["q_proj", "v_proj"]
    assert target_modules(model, "down_proj, q_proj") == ["q_proj", "down_proj"]
    with pytest.raises(AlignXError, match="up_projection.*available: q_proj, k_proj, v_proj, o_proj, gate_proj"):
        target_modules(model, "q_proj,up_projection")


def test_target_modules_generic_architecture():
    """Not Llama-shaped: GPT-2 (Conv1D projections, c_proj in both attention and MLP) works with peft."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("gpt2", n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=64,
                                  bos_token_id=0, eos_token_id=0)
    model = AutoModelForCausalLM.from_config(config)
    assert len(decoder_layers(model)) == 2
    assert target_modules(model, "attention-mlp") == ["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"]
    assert target_modules(model, "qv") == ["c_attn"]
    names = target_modules(model, "attention")
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=names, fan_in_fan_out=True))
    wrapped = sorted(n.rsplit(".", 2)[-2] for n, _ in peft_model.named_modules() if n.endswith("lora_A"))
    assert wrapped == ["c_attn", "c_attn", "c_proj", "c_proj"]
    assert not any(".mlp." in n for n, _ in peft_model.named_modules() if n.endswith("lora_A"))
