"""Loading a base model: architectures, training mode, pad tokens, one-line errors; weight digests."""

from __future__ import annotations

import copy
import os
import pickle
import shutil
import time
from pathlib import Path

import pytest
import torch
from conftest import ARCHITECTURES

from alignx.config import ModelConfig
from alignx.errors import AlignXError
from alignx.models import digests, loading, source
from alignx.models.loading import load_base_model
from alignx.run import file_sha256


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_directory_load(tiny_model_dirs, arch):
    loaded = load_base_model(ModelConfig(name=str(tiny_model_dirs[arch])))
    assert loaded.num_layers == 3 and loaded.dtype == torch.float32
    assert loaded.model.config.model_type == arch and not loaded.model.training
    assert loaded.source_id == str(tiny_model_dirs[arch].resolve())
    assert loaded.weights_sha256 == file_sha256(tiny_model_dirs[arch] / "model.safetensors")
    tok = loaded.tokenizer
    assert tok.pad_token is not None and tok.padding_side == "right"
    batch = tok(["Give three tips", "What are the three primary colors?"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = loaded.model(**batch).logits
    assert logits.shape == (2, batch["input_ids"].shape[1], len(tok)) and torch.isfinite(logits).all()


def test_large_directory_digest_is_memoised(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(digests, "_MEMO_DIGEST_BYTES", 1)
    expected = file_sha256(tiny_model_dir / "model.safetensors")
    assert digests.directory_weights_sha256(tiny_model_dir) == expected
    memo = list((Path(os.environ["ALIGNX_CACHE_DIR"]) / "digests").iterdir())
    assert len(memo) == 1 and memo[0].read_text().strip() == expected
    memo[0].write_text("0" * 64)  # proves the second call reads the memo instead of re-hashing
    assert digests.directory_weights_sha256(tiny_model_dir) == "0" * 64


def test_for_training_mode(tiny_model_dir):
    loaded = load_base_model(ModelConfig(name=str(tiny_model_dir)), for_training=True)
    assert loaded.model.training and loaded.model.config.use_cache is False
    assert next(loaded.model.parameters()).dtype == torch.float32


def test_missing_pad_token_becomes_eos(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.pad_token = None
    tok.padding_side = "left"
    loading._ensure_pad_token(tok, source.ModelSource("directory", "x", "x"))
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


class _LeavesAMark:
    """Unpickling this runs code: what a pickled checkpoint can do when it is opened."""

    def __init__(self, mark: Path):
        self.mark = mark

    def __reduce__(self):
        return (Path.write_text, (self.mark, "the pickle ran"))


def test_a_pickled_checkpoint_is_never_opened(tiny_model_dir, tmp_path):
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, pickled, ignore=shutil.ignore_patterns("*.safetensors"))
    mark = tmp_path / "mark"
    (pickled / "pytorch_model.bin").write_bytes(pickle.dumps({"model.embed_tokens.weight": _LeavesAMark(mark)}))
    with pytest.raises(AlignXError, match="has no safetensors weights, and AlignX never opens a pickled checkpoint") as info:
        load_base_model(ModelConfig(name=str(pickled)))
    assert "\n" not in str(info.value) and not mark.exists()


def test_a_runs_config_never_turns_on_remote_code(tmp_path):
    asks = ModelConfig(name="someone/model", trust_remote_code=True)
    with pytest.raises(AlignXError, match=f"{tmp_path} asks to run the code of its base model 'someone/model'.*--trust-remote-code"):
        loading.run_model_config(asks, tmp_path)
    assert loading.run_model_config(asks, tmp_path, trust_remote_code=True).trust_remote_code
    chosen = loading.run_model_config(ModelConfig(name="someone/model"), tmp_path, model="me/model")
    assert (chosen.name, chosen.trust_remote_code) == ("me/model", False)
