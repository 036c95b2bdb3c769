"""FastDropout makes the same Bernoulli decisions as nn.Dropout, in every 16-bit lane."""

import torch
from peft import LoraConfig, get_peft_model

from alignx.stage1.fast_dropout import FastDropout, use_fast_dropout


def test_drop_rate_is_p_in_every_lane():
    torch.manual_seed(0)
    dropout = FastDropout(0.05)
    keep = dropout.keep_mask(torch.empty(400_000))
    lanes = keep.view(-1, 4).float().mean(0)  # the four int16 slices of each 64-bit word
    assert torch.allclose(lanes, torch.full((4,), 0.95), atol=0.003), lanes


def test_expectation_gradient_and_eval_mode():
    torch.manual_seed(0)
    dropout = FastDropout(0.2)
    x = torch.ones(200_000, requires_grad=True)
    y = dropout(x)
    assert abs(y.mean().item() - 1.0) < 0.01  # inverted scaling keeps the expectation
    assert set(torch.unique(y).tolist()) == {0.0, 1.25}
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # gradient flows only through kept units, scaled
    dropout.eval()
    assert dropout(x) is x


def test_swaps_only_lora_dropouts(tiny_model_dir):
    from alignx.config import ModelConfig
    from alignx.models.loading import load_base_model

    model = get_peft_model(
        load_base_model(ModelConfig(name=str(tiny_model_dir)), for_training=True).model,
        LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "down_proj"]),
    )
    assert use_fast_dropout(model) == 2 * 3
    assert sum(isinstance(m, FastDropout) for m in model.modules()) == 6


def test_under_autocast_it_drops_out_in_the_autocast_dtype():
    torch.manual_seed(0)
    x = torch.ones(1000)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = FastDropout(0.5).train()(x)
    assert y.dtype == torch.bfloat16 and set(torch.unique(y.float()).tolist()) == {0.0, 2.0}
