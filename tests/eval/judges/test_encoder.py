"""The language-model text encoder: a decoder layer's content-token mean, cached per text."""

from __future__ import annotations

import numpy as np
import pytest

from alignx.config import ModelConfig
from alignx.data.formatting import ChatFormatter
from alignx.errors import AlignXError
from alignx.eval.judges.encoder import TextEncoder
from alignx.models.loading import load_base_model
from alignx.models.precision import autocast_dtype
from alignx.stage1.features import prompt_features

TEXTS = ["Request: How do I bake bread?\n\nAnswer: Mix flour, water and yeast.", "Request: Hi\n\nAnswer: Hello!"]


def test_lm_encoder_reads_the_layer_and_caches_it(tiny_model_dir, tmp_path, monkeypatch):
    encoder = TextEncoder("smollm2-135m-layer2", cache_dir=tmp_path, batch_size=2, model=str(tiny_model_dir))
    vectors = encoder.encode(TEXTS)
    loaded = load_base_model(ModelConfig(name=str(tiny_model_dir), precision="fp32"))
    expected = prompt_features(loaded.model, ChatFormatter(loaded.tokenizer), TEXTS, (2, 2), max_length=256,
                               autocast_dtype=autocast_dtype(ModelConfig(), "cpu"))[2].numpy()  # as the encoder runs it
    np.testing.assert_allclose(vectors, expected, rtol=1e-5, atol=1e-5)
    assert vectors.shape == (2, loaded.model.config.hidden_size)

    again = TextEncoder("smollm2-135m-layer2", cache_dir=tmp_path, model=str(tiny_model_dir))
    monkeypatch.setattr(TextEncoder, "_embed_with_lm", lambda *_: pytest.fail("a cached text was encoded again"))
    np.testing.assert_array_equal(again.encode(TEXTS[::-1]), vectors[::-1])
    assert again.encode([]).shape == (0, vectors.shape[1])


def test_lm_encoder_refuses_a_layer_the_model_lacks(tiny_model_dir):
    with pytest.raises(AlignXError, match="has decoder layers 1-"):
        TextEncoder("smollm2-135m-layer99", model=str(tiny_model_dir)).encode(["a text"])
    with pytest.raises(AlignXError, match="unknown text encoder"):
        TextEncoder("smollm2-135m-layerx")
