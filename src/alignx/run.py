"""The run directory: its layout, its manifest, its lock, and the atomic writes everything uses.

Layout (one directory per run; every file is safetensors, JSON, JSONL or YAML — never pickle)::

    <run>/
      config.yaml                    the resolved configuration the run was started with
      manifest.json                  base model id + weight hash, data split hashes, library versions, experts
      run.lock                       held while an alignx process works on this run
      experts/<axis>/adapter/        PEFT adapter (adapter_config.json + adapter_model.safetensors)
      experts/<axis>/train_log.jsonl one line per optimizer step: loss, lr, tokens, tokens/s
      experts/<axis>/summary.json    final figures of the axis's training
      experts/<axis>/checkpoints/step-NNNNNN/   resumable training state (last few kept)
      experts/<axis>/task_vector.safetensors    on demand: (alpha/r)·B·A per target module
      features/<axis>.safetensors    task-feature bank: router and calibrator features per training prompt

Every write goes to a temporary file in the same directory and is moved into place with
``os.replace``, so an interruption (even kill -9) leaves either the old file or the new one.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import yaml
from safetensors import safe_open
from safetensors.torch import save

from alignx.config import AlignXConfig, load_config
from alignx.errors import AlignXError


class RunDir:
    """Paths of one run; creating the object touches nothing on disk."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    def expert_dir(self, axis: str) -> Path:
        return self.root / "experts" / axis

    def adapter_dir(self, axis: str) -> Path:
        return self.expert_dir(axis) / "adapter"

    def train_log_path(self, axis: str) -> Path:
        return self.expert_dir(axis) / "train_log.jsonl"

    def summary_path(self, axis: str) -> Path:
        return self.expert_dir(axis) / "summary.json"

    def checkpoints_dir(self, axis: str) -> Path:
        return self.expert_dir(axis) / "checkpoints"

    def task_vector_path(self, axis: str) -> Path:
        return self.expert_dir(axis) / "task_vector.safetensors"

    def features_path(self, axis: str) -> Path:
        return self.root / "features" / f"{axis}.safetensors"

    def load_config(self, overrides: list[str] | tuple[str, ...] = ()) -> AlignXConfig:
        """The run's own config.yaml (plus overrides); a clear error when this is not a run directory."""
        if not self.config_path.is_file():
            raise AlignXError(f"{self.root} is not an AlignX run (no config.yaml): run `alignx stage1 --run {self.root}` first")
        return load_config(self.config_path, overrides)

    def save_config(self, config: AlignXConfig) -> None:
        """Write the resolved config as YAML (atomically), so the run records exactly what it used."""
        atomic_write_text(self.config_path, yaml.safe_dump(config.to_dict(), sort_keys=False))

    def has_adapter(self, axis: str) -> bool:
        return (self.adapter_dir(axis) / "adapter_config.json").is_file()

    def has_trained_expert(self, axis: str) -> bool:
        """Whether the axis's training finished: its adapter and its summary (written before the adapter)."""
        return self.has_adapter(axis) and self.summary_path(axis).is_file()

    def read_manifest(self) -> dict[str, Any]:
        if not self.manifest_path.is_file():
            return {}
        return read_json(self.manifest_path)

    def update_manifest(self, **sections: Any) -> dict[str, Any]:
        """Merge top-level sections into manifest.json (nested dicts merge one level deep)."""
        manifest = self.read_manifest()
        for key, value in sections.items():
            if isinstance(value, dict) and isinstance(manifest.get(key), dict):
                manifest[key] = {**manifest[key], **value}
            else:
                manifest[key] = value
        atomic_write_json(self.manifest_path, manifest)
        return manifest

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold an exclusive lock on the run, so two alignx processes never interleave their writes."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / "run.lock"
        handle = open(path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            handle.seek(0)
            owner = handle.read().strip() or "another process"
            handle.close()
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise AlignXError(
                    f"run directory {self.root} is in use by {owner}; wait for it to finish or use another --run"
                ) from None
            raise
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(f"alignx pid {os.getpid()}\n")
            handle.flush()
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise AlignXError(f"file not found: {path}") from None
    except json.JSONDecodeError as exc:
        raise AlignXError(f"{path} is not valid JSON ({exc}); it may be truncated or corrupted") from None


def jsonl_objects(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) of a user's JSONL file; blank lines are skipped, anything else that is not a
    JSON object is an error naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise AlignXError(f"input file not found: {path}")
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise AlignXError(f"{path}:{number} is not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise AlignXError(f"{path}:{number} must be a JSON object")
        yield number, row


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks (a feature bank or a model can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, value: Any) -> None:
    atomic_write_text(path, json.dumps(value, indent=2, sort_keys=False) + "\n")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so readers see the old content or the new, never a torn file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_save_safetensors(tensors: dict, path: Path, metadata: dict[str, str] | None = None) -> None:
    """Save tensors as safetensors atomically (contiguous copies; shared storage is not allowed there)."""
    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
    atomic_write_bytes(path, data)


def load_safetensors(path: Path) -> tuple[dict, dict[str, str]]:
    """Load tensors and metadata, turning a truncated or corrupted file into a clear error naming it.

    Each tensor is a copy of its own: tensors read from one file share its memory map, so a caller that keeps
    any of them (a router keeps its small tensors as they are and its feature banks transposed) would keep every
    page it has read of the whole file resident (61 MiB beside three 20,000-point banks' own copies)."""
    path = Path(path)
    if not path.is_file():
        raise AlignXError(f"file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key).clone() for key in handle.keys()}
    except Exception as exc:  # safetensors raises its own error types for every kind of damage
        raise AlignXError(f"{path} is not a readable safetensors file ({exc}); it may be truncated or corrupted") from None
    return tensors, metadata


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling directory that replaces ``final`` only if the block completes.

    Where the system can (Linux ``renameat2`` with ``RENAME_EXCHANGE``: ext4, xfs, btrfs, tmpfs and others),
    the new directory and the old one swap places in one step, so ``final`` is never missing. POSIX
    ``rename`` alone cannot replace a non-empty directory; elsewhere the old one is first moved aside, and for
    that moment ``final`` does not exist. Every temporary name (the staging directory, the old one moved aside)
    is unique and carries this process's id, so a crash leaves nothing in the way of the next replace, and
    whatever a dead process left is removed here."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.{os.getpid()}-", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        if not final.exists():
            os.rename(tmp, final)
            return
        if _exchange(tmp, final):
            old = tmp  # the old directory, now under the temporary name
        else:
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.{os.getpid()}-", suffix=".old", dir=final.parent))
            os.rename(final, old)  # onto an empty directory, which POSIX allows
            try:
                os.rename(tmp, final)
            except BaseException:
                os.rename(old, final)
                raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)  # what fails to go here carries this pid: a later replace removes it


_LIBC = ctypes.CDLL(None, use_errno=True)
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the system or the file
    system cannot, so the caller falls back to two renames."""
    renameat2 = getattr(_LIBC, "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def _remove_leftovers(final: Path) -> None:
    """Remove the temporary siblings of ``final`` that :func:`atomic_dir` made in processes no longer running
    (a crash or kill -9 mid-replace); those of live processes, this one included, may still be in use."""
    pattern = re.compile(rf"^\.{re.escape(final.name)}\.(?:(\d+)-[^/]+\.(?:tmp|old)|old-(\d+))$")
    for path in final.parent.iterdir():
        match = pattern.match(path.name)
        if match and path.is_dir() and not path.is_symlink() and not _alive(int(match.group(1) or match.group(2))):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    """Whether a process of this id runs (a reused id only delays the clean-up: names never collide)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True
