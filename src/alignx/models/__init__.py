"""Base models, one module per concept.

- :mod:`~alignx.models.source`: where a model comes from (embedded default, GGUF, directory, hub id);
- :mod:`~alignx.models.loading`: :func:`load_base_model`, fp32 weights and a tokenizer with a pad token;
- :mod:`~alignx.models.gguf_cache`: the dequantised, cached copy of a GGUF file;
- :mod:`~alignx.models.digests`: the sha256 of a model's weight files;
- :mod:`~alignx.models.precision`: bf16 autocast and the frozen weights stored in its dtype;
- :mod:`~alignx.models.layers`: decoder layers and LoRA target modules.
"""
