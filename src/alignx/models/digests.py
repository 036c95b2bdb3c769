"""The sha256 of a model's weight files, which every run records beside the model's id."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from huggingface_hub import try_to_load_from_cache

from alignx.config import cache_dir

TMP_INFIX = ".tmp-"
_MEMO_DIGEST_BYTES = 64 << 20  # weight files smaller than this are simply hashed again


def weight_files(directory: Path) -> list[str]:
    """Names of the weight files transformers loads from a model directory (safetensors first)."""
    for index, single in (("model.safetensors.index.json", "model.safetensors"),
                          ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if (directory / index).is_file():
            weight_map = json.loads((directory / index).read_text()).get("weight_map", {})
            return sorted(set(weight_map.values()))
        if (directory / single).is_file():
            return [single]
    return sorted(p.name for p in directory.glob("*.safetensors"))


def sha256_files(directory: Path, names: list[str]) -> str:
    """Streamed sha256 over the files' bytes concatenated in the given order."""
    digest = hashlib.sha256()
    for name in names:
        with open(directory / name, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def directory_weights_sha256(directory: Path) -> str:
    """Digest of a directory's weight files; above 64 MiB it is memoised in the cache, keyed by the directory
    and each file's (name, size, mtime), so a large model is not re-hashed on every load."""
    names = weight_files(directory)
    if not names:
        return ""
    stats = [(n, (directory / n).stat()) for n in names]
    if sum(s.st_size for _, s in stats) < _MEMO_DIGEST_BYTES:
        return sha256_files(directory, names)
    key = hashlib.sha256(
        repr([str(directory.resolve())] + [(n, s.st_size, s.st_mtime_ns) for n, s in stats]).encode()
    ).hexdigest()[:32]
    memo = cache_dir() / "digests" / f"{key}.sha256"
    try:
        cached = memo.read_text().strip()
        if re.fullmatch(r"[0-9a-f]{64}", cached):
            return cached
    except OSError:
        pass
    digest = sha256_files(directory, names)
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f"{memo.name}{TMP_INFIX}{os.getpid()}")
        tmp.write_text(digest + "\n")
        os.replace(tmp, memo)
    except OSError:
        pass  # a read-only cache only costs the recomputation
    return digest


def hub_snapshot(hub_id: str) -> Path | None:
    """The local Hugging Face cache's copy of a hub model (where it was loaded from), or None if not cached."""
    config_path = try_to_load_from_cache(hub_id, "config.json")
    return Path(config_path).parent if isinstance(config_path, str) else None


def hub_weights_sha256(hub_id: str) -> str:
    """Digest of a hub model's weight files, found in the local Hugging Face cache it was just loaded from."""
    snapshot = hub_snapshot(hub_id)
    return "" if snapshot is None else directory_weights_sha256(snapshot)
