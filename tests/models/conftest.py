import pytest


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Every test here gets its own AlignX cache (GGUF copies, weight digests)."""
    monkeypatch.setenv("ALIGNX_CACHE_DIR", str(tmp_path / "alignx-cache"))
