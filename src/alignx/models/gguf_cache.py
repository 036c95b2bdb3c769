"""The dequantised copy of a GGUF model, converted once and cached.

GGUF files are dequantised through transformers' GGUF support once and cached as fp32 safetensors (with the
tokenizer) under ``<cache>/models/<stem>-<key>/`` where ``<cache>`` is :func:`alignx.config.cache_dir` and
``<key>`` is the first 16 hex digits of ``sha256(f"{size}:{mtime_ns}")`` of the GGUF file (its size and
modification time: hashing ~100 MB on every load would cost more than loading the cache). The cache is
written to a temporary sibling directory and moved into place with ``os.replace``, so an interrupted or
concurrent conversion never leaves a half cache that a later load would use; stale temporary directories of
dead processes are removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from alignx.config import cache_dir
from alignx.errors import AlignXError
from alignx.models.digests import TMP_INFIX, sha256_files, weight_files

_CACHE_FORMAT = 1
MARKER = "alignx_cache.json"  # written last inside the temp dir: a cache dir without it is not a cache
_REFERENCE = "alignx_gguf_reference_logits.safetensors"  # GGUF-loaded model's logits on a short probe
_PROBE_TEXT = "The capital of France is"
_STALE_TMP_SECONDS = 24 * 3600  # temp dirs of a live pid younger than this are left alone


def gguf_cache_path(gguf: Path) -> Path:
    """``<cache>/models/<stem>-<first 16 hex of sha256("size:mtime_ns")>`` for this GGUF file."""
    st = gguf.stat()
    key = hashlib.sha256(f"{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "models" / f"{gguf.stem}-{key}"


def gguf_cache(gguf: Path) -> Path:
    """The directory of the dequantised safetensors copy of ``gguf``, converting it first when needed."""
    final = gguf_cache_path(gguf)
    if final.parent.is_dir():
        _remove_stale_temps(final)
    if _valid_cache(final):
        return final
    tmp = final.parent / f".{final.name}{TMP_INFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        _convert_gguf(gguf, tmp)
        _write_marker(tmp, gguf)
        if final.exists() and not _valid_cache(final):
            shutil.rmtree(final, ignore_errors=True)  # an invalid leftover (not ours to keep)
        try:
            os.replace(tmp, final)
        except OSError:
            if not _valid_cache(final):  # not merely a concurrent conversion that finished first
                raise
    except OSError as exc:
        raise AlignXError(
            f"could not write the model cache in {final.parent}: {exc.strerror or exc}; "
            "set ALIGNX_CACHE_DIR to a writable folder with several times the GGUF file's size free"
        ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _write_marker(out: Path, gguf: Path) -> None:
    """Record the weights' digest and the files a complete cache holds; written last, before the move."""
    names = weight_files(out)
    if not names or not (out / "config.json").is_file():
        raise RuntimeError(f"GGUF conversion of {gguf} left no weights or config in {out}")
    st = gguf.stat()
    marker = {
        "format": _CACHE_FORMAT,
        "gguf": str(gguf),
        "gguf_size": st.st_size,
        "gguf_mtime_ns": st.st_mtime_ns,
        "weights_sha256": sha256_files(out, names),
        "files": names + [f for f in ("config.json", _REFERENCE) if (out / f).is_file()],
    }
    (out / MARKER).write_text(json.dumps(marker, indent=2))


def _valid_cache(path: Path) -> bool:
    try:
        marker = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("format") == _CACHE_FORMAT and all((path / f).is_file() for f in marker.get("files", []))


def _remove_stale_temps(final: Path) -> None:
    """Delete temp dirs of conversions whose process is gone (killed) or that are older than a day."""
    for tmp in final.parent.glob(f".{final.name}{TMP_INFIX}*"):
        pid_text = tmp.name[len(f".{final.name}{TMP_INFIX}"):].split("-")[0]
        try:
            alive = _pid_alive(int(pid_text))
            young = time.time() - tmp.stat().st_mtime < _STALE_TMP_SECONDS
        except (ValueError, OSError):
            alive, young = False, False
        if not (alive and young):
            shutil.rmtree(tmp, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except PermissionError:  # exists, owned by someone else
        return True
    except (ProcessLookupError, OverflowError, ValueError):
        return False
    return True


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise ``gguf`` with transformers and save model, tokenizer and reference logits into new dir ``out``."""
    try:
        with _memoised_gguf_parsing():
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            quantised = AutoModelForCausalLM.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
            )
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise AlignXError(f"transformers cannot load the GGUF file {gguf}: {detail}") from None
    # A GGUF-loaded model refuses save_pretrained: copy its (dequantised) weights into a plain model.
    config_dict = quantised.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config_dict.pop("_model_name_or_path", None)
    config = type(quantised.config).from_dict(config_dict)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantised.state_dict(), strict=True)
    plain.eval()
    quantised.eval()

    probe = tokenizer(_PROBE_TEXT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        reference = quantised(input_ids=probe).logits.float()
        copied = plain(input_ids=probe).logits.float()
    if not torch.allclose(reference, copied, atol=1e-5, rtol=0):
        worst = (reference - copied).abs().max().item()
        raise RuntimeError(f"dequantised copy of {gguf} differs from the GGUF-loaded model (max |diff| {worst})")

    out.mkdir(parents=True)
    plain.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    save_file({"input_ids": probe.contiguous(), "logits": reference.contiguous()}, str(out / _REFERENCE))


@contextlib.contextmanager
def _memoised_gguf_parsing() -> Iterator[None]:
    """Speed-up only (~40% of the conversion): transformers parses the GGUF file three times (tokenizer,
    config, weights) and rebuilds gguf's tensor-name table once per module (~400 times). Both are pure
    functions of their arguments, so they are memoised for the duration of one conversion, then restored."""
    try:
        import gguf
    except ImportError:
        yield
        return
    saved = {name: getattr(gguf, name) for name in ("GGUFReader", "get_tensor_name_map") if hasattr(gguf, name)}
    memo: dict[tuple, Any] = {}

    def memoised(name: str):
        original = saved[name]

        def call(*args: Any, **kwargs: Any) -> Any:
            key = (name, tuple(os.fspath(a) if isinstance(a, Path) else a for a in args), tuple(sorted(kwargs.items())))
            if key not in memo:
                memo[key] = original(*args, **kwargs)
            return memo[key]

        return call

    try:
        for name in saved:
            setattr(gguf, name, memoised(name))
        yield
    finally:
        for name, original in saved.items():
            setattr(gguf, name, original)
        memo.clear()


def gguf_reference(weights_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, logits) the GGUF-loaded model produced at conversion, to check the cached copy against."""
    tensors = load_file(str(Path(weights_dir) / _REFERENCE))
    return tensors["input_ids"], tensors["logits"]
