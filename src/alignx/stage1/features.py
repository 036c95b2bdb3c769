"""Task features: what the frozen base model "thinks" of a prompt, at the router and calibrator layers.

h(x) = mean over the prompt's *content* tokens of the base's hidden state after decoder layer ℓ, for the
prompt as it arrives at inference (no injection, no default system prompt). One partial prefill computes
both layers and stops at the deeper one: the layers above it are never run. Stage 1 stores these for
every training prompt of an axis (the axis's feature cloud); Stage 2 computes them for each new prompt.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
from tqdm.auto import tqdm

from alignx.data.formatting import ChatFormatter
from alignx.models.layers import decoder_layers


class _PrefillDone(Exception):
    """Raised from a forward hook to stop the prefill once the deepest needed layer has run."""


def feature_settings(base_weights_sha256: str, layers: tuple[int, int], max_length: int,
                     autocast_dtype: torch.dtype | None) -> dict[str, str]:
    """Everything a task feature depends on besides its prompt, as safetensors metadata: the base weights,
    the two layers, the prompt truncation and the compute precision. A cache of features (a bank, Stage 2's
    evaluation features) is valid only while all of these match."""
    return {
        "base_weights_sha256": base_weights_sha256,
        "router_layer": str(layers[0]),
        "calibrator_layer": str(layers[1]),
        "max_length": str(max_length),
        "precision": str(autocast_dtype or torch.float32).removeprefix("torch."),
    }


@contextmanager
def _capture_layers(model, layers: tuple[int, ...]):
    """Record the outputs of the given 1-based decoder layers and stop the forward after the deepest."""
    blocks = decoder_layers(model)
    captured: dict[int, torch.Tensor] = {}
    deepest = max(layers)

    def hook_for(layer: int):
        def hook(_module, _args, output):
            captured[layer] = output[0] if isinstance(output, tuple) else output
            if layer == deepest:
                raise _PrefillDone

        return hook

    handles = [blocks[layer - 1].register_forward_hook(hook_for(layer)) for layer in sorted(set(layers))]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


@torch.inference_mode()
def prompt_features(
    model,
    formatter: ChatFormatter,
    prompts: list[str],
    layers: tuple[int, int],
    *,
    batch_size: int = 32,
    max_length: int,
    autocast_dtype: torch.dtype | None = None,
    progress: str | None = None,
) -> dict[int, torch.Tensor]:
    """Content-token mean of the hidden states at each layer in ``layers``: ``{layer: [len(prompts), d]}``.

    Prompts are batched by length (right padding, so causal attention never sees the pads) and the
    results are returned in the input order, as float32.
    """
    device = next(model.parameters()).device
    encoded = [formatter.encode_prompt(p, max_length) for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))
    results: dict[int, list[torch.Tensor]] = {layer: [None] * len(prompts) for layer in set(layers)}  # type: ignore[list-item]
    pad_id = formatter.tokenizer.pad_token_id or 0
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc=progress or "features", unit="batch", disable=progress is None, dynamic_ncols=True):
        width = max(len(encoded[i].input_ids) for i in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        content = torch.zeros((len(batch), width), dtype=torch.float32)
        for row, index in enumerate(batch):
            n = len(encoded[index].input_ids)
            ids[row, :n] = torch.tensor(encoded[index].input_ids)
            attention[row, :n] = 1
            content[row, :n] = torch.tensor(encoded[index].content_mask, dtype=torch.float32)
        content = content.to(device)
        with _capture_layers(model, layers) as captured:
            autocast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
            with autocast:
                try:
                    model(input_ids=ids.to(device), attention_mask=attention.to(device), use_cache=False)
                except _PrefillDone:
                    pass
        for layer, hidden in captured.items():
            pooled = (hidden.float() * content[..., None]).sum(1) / content.sum(1, keepdim=True)
            for row, index in enumerate(batch):
                results[layer][index] = pooled[row].cpu()
    return {layer: torch.stack(rows) if rows else torch.empty(0) for layer, rows in results.items()}
