"""Task features: one partial prefill, content tokens only, independent of batching."""

import pytest
import torch

from alignx.config import ModelConfig
from alignx.data.formatting import ChatFormatter
from alignx.models.layers import decoder_layers
from alignx.models.loading import load_base_model
from alignx.stage1.features import prompt_features

PROMPTS = ["What is 2+2?", "Give three tips for staying healthy, each with a short reason.", "Hi"]


@pytest.fixture(scope="module")
def loaded(tiny_model_dirs):
    loaded = load_base_model(ModelConfig(name=str(tiny_model_dirs["qwen2"]), precision="fp32"))
    loaded.model.eval()
    return loaded


def test_features_equal_the_full_forward_pooled_over_content_tokens(loaded):
    formatter = ChatFormatter(loaded.tokenizer)
    features = prompt_features(loaded.model, formatter, PROMPTS, (1, 2), batch_size=8, max_length=256)
    for i, prompt in enumerate(PROMPTS):
        encoded = formatter.encode_prompt(prompt, 256)
        with torch.no_grad():
            out = loaded.model(input_ids=torch.tensor([encoded.input_ids]), output_hidden_states=True)
        mask = torch.tensor(encoded.content_mask)
        for layer in (1, 2):
            expected = out.hidden_states[layer][0][mask].mean(0)
            torch.testing.assert_close(features[layer][i], expected, rtol=1e-4, atol=1e-5)


def test_batching_does_not_change_features(loaded):
    formatter = ChatFormatter(loaded.tokenizer)
    together = prompt_features(loaded.model, formatter, PROMPTS, (2, 2), batch_size=8, max_length=256)[2]
    alone = torch.cat([prompt_features(loaded.model, formatter, [p], (2, 2), max_length=256)[2] for p in PROMPTS])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)


def test_prefill_stops_at_the_deepest_needed_layer(loaded):
    calls = []
    blocks = decoder_layers(loaded.model)
    hooks_before = [len(b._forward_hooks) for b in blocks]
    handle = blocks[-1].register_forward_hook(lambda *_: calls.append(1))
    try:
        prompt_features(loaded.model, ChatFormatter(loaded.tokenizer), PROMPTS, (1, 2), max_length=256)
    finally:
        handle.remove()
    assert len(blocks) == 3 and calls == []  # layer 3 never ran
    assert [len(b._forward_hooks) for b in blocks] == hooks_before  # our hooks are gone
