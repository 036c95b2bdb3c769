"""Reading a model's weights back from its safetensors files (what an in-place merge restores)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import ARCHITECTURES
from safetensors.torch import load_file, save_file

from alignx.config import ModelConfig
from alignx.models.checkpoint import CheckpointWeights
from alignx.models.layers import decoder_layers
from alignx.models.loading import load_base_model


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_projection_reads_back_as_the_loaded_model_holds_it(tiny_model_dirs, arch):
    loaded = load_base_model(ModelConfig(name=str(tiny_model_dirs[arch])))
    weights = CheckpointWeights.of(ModelConfig(name=str(tiny_model_dirs[arch])))
    projections = {f"{name}.weight": m.weight for name, m in decoder_layers(loaded.model).named_modules(
        prefix=_prefix(loaded.model)) if isinstance(m, torch.nn.Linear)}
    assert projections and all(key in weights for key in projections)
    assert all(torch.equal(weights.tensor(key), weight) for key, weight in projections.items())


def _prefix(model) -> str:
    layers = decoder_layers(model)
    return next(name for name, module in model.named_modules() if module is layers)


def test_a_sharded_checkpoint_is_read_through_its_index(tiny_model_dir, tmp_path):
    tensors = load_file(tiny_model_dir / "model.safetensors")
    keys = sorted(tensors)
    halves = {"a.safetensors": keys[: len(keys) // 2], "b.safetensors": keys[len(keys) // 2:]}
    for name, part in halves.items():
        save_file({k: tensors[k] for k in part}, tmp_path / name, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: name for name, part in halves.items() for k in part}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    weights = CheckpointWeights(tmp_path)
    assert weights.files[keys[0]].name == "a.safetensors" and weights.files[keys[-1]].name == "b.safetensors"
    assert all(torch.equal(weights.tensor(k), tensors[k]) for k in keys)


def test_no_safetensors_means_nothing_to_read_back(tiny_model_dir, tmp_path):
    for name in ("config.json",):
        shutil.copy(tiny_model_dir / name, tmp_path / name)
    torch.save({}, tmp_path / "pytorch_model.bin")
    assert CheckpointWeights.of(ModelConfig(name=str(tmp_path))) is None
    with pytest.raises(FileNotFoundError, match="no safetensors"):
        CheckpointWeights(tmp_path)
