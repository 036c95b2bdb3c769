"""A model's weights as they lie in its safetensors files: the originals that an in-place merge restores.

Merging a request's expert mix into the base weights *in place* keeps a server's memory at the base model's,
but the arithmetic cannot be undone exactly in floating point ((W + Δ) − Δ ≠ W). The checkpoint can: the
files the model was loaded from are on disk already, so :class:`CheckpointWeights` reads a projection's
original weight back from them (one tensor at a time, each file opened and closed for the read, so no mapping
stays resident) and :mod:`alignx.mixing` casts it to the dtype the model stores it in, which is how the model
got that weight in the first place. :meth:`MixtureOfExperts.attach <alignx.mixing.MixtureOfExperts.attach>`
checks that equality bit for bit for every projection before it relies on it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from alignx.config import ModelConfig
from alignx.models.digests import hub_snapshot, weight_files
from alignx.models.loading import model_directory


class CheckpointWeights:
    """Where each tensor of a directory's safetensors weight files lives, and a way to read one back."""

    def __init__(self, directory: Path | str):
        self.directory = Path(directory)
        self.files: dict[str, Path] = {}
        for name in weight_files(self.directory):
            if name.endswith(".safetensors"):
                with safe_open(self.directory / name, framework="pt") as handle:
                    self.files.update({key: self.directory / name for key in handle.keys()})
        if not self.files:
            raise FileNotFoundError(f"no safetensors weights in {self.directory}")

    @classmethod
    def of(cls, config: ModelConfig) -> "CheckpointWeights | None":
        """The files ``config``'s model loads from (a GGUF's cache, a directory, or the local copy of a hub
        model), or None where there are none to read back (pickled weights, a hub model not in the cache)."""
        location = model_directory(config)
        directory = Path(location) if Path(location).is_dir() else hub_snapshot(location)
        try:
            return None if directory is None else cls(directory)
        except FileNotFoundError:
            return None

    def __contains__(self, key: str) -> bool:
        return key in self.files

    def tensor(self, key: str) -> torch.Tensor:
        """The tensor ``key`` as stored, in memory of its own (the file is closed again)."""
        with safe_open(self.files[key], framework="pt") as handle:
            return handle.get_tensor(key)
