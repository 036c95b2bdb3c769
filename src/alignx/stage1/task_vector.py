"""LoRA factors and task vectors, read straight from an adapter's safetensors.

The task vector of an expert is τ = (α/r)·B·A per target module: exactly what merging the adapter adds to
the base weight. It is computed from the stored factors, never as "merged minus base" of a model that
was mutated in place (the authors' code gets that wrong). Stage 2's mixed-expert layer reads the same
factors, so this module is the one home of the LoRA arithmetic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from alignx.errors import AlignXError
from alignx.run import load_safetensors, read_json

_PREFIX = "base_model.model."


@dataclass
class LoraFactors:
    """One target module's factors: delta W = scale · B @ A, A: [r, in], B: [out, r]."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float

    def delta(self) -> torch.Tensor:
        return self.scale * (self.B.float() @ self.A.float())


def adapter_config(adapter_dir: Path) -> dict:
    path = Path(adapter_dir) / "adapter_config.json"
    if not path.is_file():
        raise AlignXError(f"{adapter_dir} is not a PEFT adapter directory (no adapter_config.json)")
    config = read_json(path)
    if config.get("peft_type") != "LORA":
        raise AlignXError(f"{adapter_dir} holds a {config.get('peft_type')} adapter; AlignX experts are LoRA")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise AlignXError(f"{adapter_dir}: per-module rank_pattern/alpha_pattern adapters are not supported")
    return config


def lora_factors(adapter_dir: Path) -> dict[str, LoraFactors]:
    """``{module name in the base model: LoraFactors}`` of a PEFT LoRA adapter."""
    config = adapter_config(adapter_dir)
    r, alpha = config["r"], config["lora_alpha"]
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    tensors, _ = load_safetensors(Path(adapter_dir) / "adapter_model.safetensors")
    factors: dict[str, LoraFactors] = {}
    for key in tensors:
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[: -len(".lora_A.weight")]
        b_key = f"{module}.lora_B.weight"
        if b_key not in tensors:
            raise AlignXError(f"{adapter_dir}: adapter has {key} but no {b_key}; the file is incomplete")
        A, B = tensors[key], tensors[b_key]
        name = module[len(_PREFIX) :] if module.startswith(_PREFIX) else module
        factors[name] = LoraFactors(A=A, B=B, scale=scale)
    if not factors:
        raise AlignXError(f"{adapter_dir}: adapter_model.safetensors holds no LoRA factors")
    return factors


def task_vector(adapter_dir: Path) -> dict[str, torch.Tensor]:
    """``{"<module>.weight": (α/r)·B·A}``, keyed like the base model's state dict."""
    fan_in_fan_out = bool(adapter_config(adapter_dir).get("fan_in_fan_out"))
    vector = {}
    for name, f in lora_factors(adapter_dir).items():
        delta = f.delta()
        vector[f"{name}.weight"] = delta.T.contiguous() if fan_in_fan_out else delta
    return vector
