"""Loading a base model and its tokenizer, whatever its source.

Weights are always loaded in fp32; bf16 is used through autocast (:func:`alignx.models.precision.autocast`),
never by casting weights. The tokenizer always has a pad token (the eos token when it has none) and
``padding_side = "right"``. A GGUF source is loaded from its dequantised cache
(:mod:`alignx.models.gguf_cache`).

Loading runs no code from the model's files unless the user asks: ``trust_remote_code`` is off by default,
so transformers builds the model and tokenizer from its own classes (never a ``modeling_*.py``, a tokenizer
class or a ``custom_generate/`` the directory carries), and weights are read from safetensors only: a pickled
``pytorch_model.bin`` can run code when it is opened, so it is never opened. A run someone else wrote is read
by :func:`run_model_config`, which never lets the run itself turn remote code on.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError
from transformers import AutoModelForCausalLM, AutoTokenizer

from alignx.config import ModelConfig
from alignx.errors import AlignXError
from alignx.models.digests import directory_weights_sha256, hub_weights_sha256
from alignx.models.gguf_cache import MARKER, gguf_cache
from alignx.models.layers import decoder_layers
from alignx.models.source import EMBEDDED_ALIAS, ModelSource, hub_offline, resolve_model_source


@dataclass
class LoadedModel:
    model: Any  # a transformers causal LM, fp32 weights, on CPU
    tokenizer: Any
    source_id: str
    weights_sha256: str  # sha256 of the weight files loaded (concatenated in name order; one file: sha256sum)
    num_layers: int
    dtype: torch.dtype  # of the weights (always fp32: bf16 comes from autocast)


def model_directory(config: ModelConfig) -> str:
    """What ``from_pretrained`` takes for this model: the safetensors cache of a GGUF, a directory, or a hub id.

    For tools that load the model themselves (lm-evaluation-harness, vLLM) and must see the same weights.
    """
    source = resolve_model_source(config.name)
    if source.kind in ("embedded", "gguf"):
        return str(gguf_cache(Path(source.location)))
    return source.location


def load_base_model(config: ModelConfig, *, for_training: bool = False) -> LoadedModel:
    """Load the base causal LM and its tokenizer on CPU in fp32.

    ``for_training`` leaves the model in train mode with ``use_cache`` off; otherwise it is in eval mode with
    gradients disabled. Either way the caller moves it to a device and (for training) wraps it with LoRA.
    """
    source = resolve_model_source(config.name)
    if source.kind in ("embedded", "gguf"):
        weights_dir = gguf_cache(Path(source.location))
        model, tokenizer = _from_pretrained(str(weights_dir), source, trust_remote_code=False)
        weights_sha256 = json.loads((weights_dir / MARKER).read_text())["weights_sha256"]
    elif source.kind == "directory":
        model, tokenizer = _from_pretrained(source.location, source, config.trust_remote_code)
        weights_sha256 = directory_weights_sha256(Path(source.location))
    else:
        offline = hub_offline()
        model, tokenizer = _from_pretrained(
            source.location, source, config.trust_remote_code, local_files_only=offline
        )
        weights_sha256 = hub_weights_sha256(source.location)

    _ensure_pad_token(tokenizer, source)
    if for_training:
        model.train()
        if getattr(model.config, "use_cache", None):
            model.config.use_cache = False
    else:
        model.eval()
        model.requires_grad_(False)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        source_id=source.display_id,
        weights_sha256=weights_sha256,
        num_layers=len(decoder_layers(model)),
        dtype=next(model.parameters()).dtype,
    )


def run_model_config(config: ModelConfig, run_root: Path, *, model: str | None = None,
                     trust_remote_code: bool = False) -> ModelConfig:
    """The base model to load for the run at ``run_root``, whose ``config.yaml`` gave ``config``: a run may be
    someone else's (an export, a download), so its file decides only which base model it was trained on.

    Only the caller's ``trust_remote_code`` (the user's ``--trust-remote-code``) lets the model run its own code;
    the run's ``model.trust_remote_code`` never does, and a run that asks for it is refused until the user allows
    it. The name the run gives (a hub id, a directory, a GGUF file, the embedded default) loads like any other,
    with no code of its own (see the module's docstring): a directory the run points at supplies tensors and a
    tokenizer, never code. ``model`` loads the base from where the user says instead (the run's own path may not
    exist on this machine)."""
    if config.trust_remote_code and not trust_remote_code:
        raise AlignXError(
            f"{run_root} asks to run the code of its base model {config.name!r} (model.trust_remote_code in its "
            "config.yaml): pass --trust-remote-code (the trust_remote_code argument in Python and in lm-eval's --model_args) "
            "only if you trust that code"
        )
    return dataclasses.replace(config, name=model or config.name, trust_remote_code=trust_remote_code)


def _from_pretrained(location: str, source: ModelSource, trust_remote_code: bool, **kwargs: Any):
    """AutoModelForCausalLM + AutoTokenizer, with the user-fixable failures turned into one-line AlignXErrors."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            location, trust_remote_code=trust_remote_code, dtype=torch.float32, use_safetensors=True, **kwargs
        )
    except (OSError, ValueError, HfHubHTTPError, KeyError) as exc:
        raise AlignXError(_load_error_message(source, exc, offline=kwargs.get("local_files_only", False))) from None
    return model, tokenizer


def _load_error_message(source: ModelSource, exc: BaseException, offline: bool) -> str:
    detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if "trust_remote_code" in str(exc):
        return (f"model {source.display_id!r} needs its own code to run: allow it (model.trust_remote_code=true, "
                "or --trust-remote-code for a run you load) only if you trust that code")
    if "cannot be loaded with `safetensors`" in str(exc) or "Error no file named model.safetensors" in str(exc):
        return (f"model {source.display_id!r} has no safetensors weights, and AlignX never opens a pickled checkpoint "
                "(it can run code): convert it with save_pretrained(..., safe_serialization=True) where you trust it")
    if source.kind == "hub":
        if isinstance(exc, GatedRepoError):
            return f"model {source.display_id!r} is gated on the Hugging Face hub: log in (`hf auth login`) with access"
        if isinstance(exc, RepositoryNotFoundError):
            return f"model {source.display_id!r} is not on the Hugging Face hub (typo, or private?): {detail}"
        why = "offline" if offline else "offline?"
        return (
            f"model {source.display_id!r} is not a local directory or GGUF file and could not be fetched from the "
            f"Hugging Face hub ({why}): pass a local directory, a .gguf file, or {EMBEDDED_ALIAS}"
        )
    return f"could not load model from {source.location}: {detail}"


def _ensure_pad_token(tokenizer: Any, source: ModelSource) -> None:
    """Give the tokenizer a pad token (its eos token when it has none) and the right-padding default."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise AlignXError(f"the tokenizer of {source.display_id!r} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
