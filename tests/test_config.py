"""Configs: YAML + overrides into dataclasses, with errors that name the bad field."""

from pathlib import Path

import pytest

from alignx.axes import AXES, DEFAULT_INJECTIONS
from alignx.config import AlignXConfig, load_config
from alignx.errors import AlignXError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_defaults_follow_the_method():
    config = load_config()
    assert (config.lora.r, config.lora.alpha, config.lora.dropout) == (16, 32, 0.05)
    assert config.train.weight_decay == 0.01 and config.train.epochs == 3
    assert config.data.helpful_rows == 20_000 and config.axes == list(AXES)
    assert config.injections == DEFAULT_INJECTIONS


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    assert isinstance(load_config(path), AlignXConfig)


def test_paper_preset_uses_the_papers_lora():
    config = load_config(CONFIGS / "paper.yaml")
    assert (config.lora.r, config.lora.alpha, config.lora.targets) == (64, 32, "qv")
    assert config.train.batch_size * config.train.grad_accum == 64 and config.train.lr == 2e-5


def test_overrides_are_typed_and_nested():
    config = load_config(CONFIGS / "default.yaml", ["train.lr=1e-3", "train.max_steps=7", "axes=honest,helpful", "data.max_rows_per_axis=null"])
    assert config.train.lr == 1e-3 and config.train.max_steps == 7
    assert config.axes == ["helpful", "honest"]  # canonical order
    assert config.data.max_rows_per_axis is None


def test_overriding_one_injection_keeps_the_others():
    config = load_config(None, ["injections.honest=Only the truth."])
    assert config.injections["honest"] == "Only the truth." and config.injections["helpful"] == DEFAULT_INJECTIONS["helpful"]


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lrr=1", "unknown config key train.lrr.*valid keys: epochs, max_steps"),
        ("bogus=1", "unknown config key bogus.*valid keys: run_dir, axes"),
        ("train.batch_size=zero", "train.batch_size must be int"),
        ("train.batch_size=0", "train.batch_size must be > 0"),
        ("model.precision=fp8", "model.precision must be one of auto, bf16, fp32"),
        ("axes=helpful,kind", "unknown axis kind"),
        ("injections.kind=x", "injections: unknown axis kind"),
        ("train", "must look like section.key=value"),
    ],
)
def test_bad_settings_are_explained(override, message):
    with pytest.raises(AlignXError, match=message):
        load_config(None, [override])


def test_bad_files_are_explained(tmp_path):
    with pytest.raises(AlignXError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(AlignXError, match="must hold a mapping"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("train: [unclosed\n")
    with pytest.raises(AlignXError, match="not valid YAML"):
        load_config(tmp_path / "broken.yaml")


def test_feature_layers_default_to_half_and_two_thirds():
    config = load_config()
    assert config.features.layers(30) == (15, 20)
    with pytest.raises(AlignXError, match="features.router_layer=40 is outside"):
        load_config(None, ["features.router_layer=40"]).features.layers(30)
