"""The run directory: atomic writes, damaged files named in errors, and a lock against concurrent runs."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

import alignx.run
from alignx.errors import AlignXError
from alignx.run import RunDir, atomic_dir, atomic_save_safetensors, atomic_write_json, load_safetensors, read_json


def test_atomic_write_keeps_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "manifest.json"
    atomic_write_json(path, {"version": 1})

    def broken_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="No space"):
        atomic_write_json(path, {"version": 2})
    assert read_json(path) == {"version": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]  # no temp file left behind


def test_atomic_dir_replaces_only_on_success(tmp_path):
    final = tmp_path / "adapter"
    with atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("first")
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as tmp:
            (tmp / "a.txt").write_text("second")
            raise RuntimeError("killed half way")
    assert (final / "a.txt").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_atomic_dir_is_not_stopped_by_what_a_crashed_replace_left(tmp_path):
    final = tmp_path / "adapter"
    with atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("first")
    parked = tmp_path / f".adapter.old-{os.getpid()}"  # what a replace killed half way left, under a reused pid
    (parked / "a.txt").parent.mkdir()
    (parked / "a.txt").write_text("from a crash")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    staged = tmp_path / f".adapter.{int(dead.stdout)}-x1y2.tmp"  # a dead process's staging directory
    staged.mkdir()
    for fallback in (False, True):
        with pytest.MonkeyPatch.context() as patch:
            if fallback:  # a file system without an atomic exchange: the old directory is moved aside first
                patch.setattr(alignx.run, "_exchange", lambda a, b: False)
            with atomic_dir(final) as tmp:
                (tmp / "a.txt").write_text(f"fallback={fallback}")
        assert (final / "a.txt").read_text() == f"fallback={fallback}"
    assert sorted(p.name for p in tmp_path.iterdir()) == [parked.name, "adapter"]  # a live pid's is left alone


def test_atomic_dir_never_leaves_a_moment_without_the_directory(tmp_path, monkeypatch):
    final = tmp_path / "adapter"
    with atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("first")
    seen = []
    for name in ("rename", "replace"):
        real = getattr(os, name)

        def watched(*args, real=real, **kwargs):
            seen.append(final.is_dir())
            return real(*args, **kwargs)

        monkeypatch.setattr(os, name, watched)
    real_rmtree = shutil.rmtree
    monkeypatch.setattr(shutil, "rmtree", lambda *a, **k: (seen.append(final.is_dir()), real_rmtree(*a, **k)))
    with atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("second")
    assert seen and all(seen)
    assert (final / "a.txt").read_text() == "second" and [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_truncated_safetensors_is_named_in_the_error(tmp_path):
    path = tmp_path / "features" / "helpful.safetensors"
    atomic_save_safetensors({"router": torch.randn(4, 8)}, path, {"axis": "helpful"})
    tensors, metadata = load_safetensors(path)
    assert tensors["router"].shape == (4, 8) and metadata == {"axis": "helpful"}
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(AlignXError, match=f"{path}.*truncated or corrupted"):
        load_safetensors(path)


def test_corrupted_json_is_named_in_the_error(tmp_path):
    (tmp_path / "state.json").write_text('{"step": 4')
    with pytest.raises(AlignXError, match="state.json is not valid JSON"):
        read_json(tmp_path / "state.json")


def test_lock_refuses_a_second_process(tmp_path):
    run = RunDir(tmp_path / "run")
    code = (
        "import sys; from alignx.run import RunDir; from alignx.errors import AlignXError\n"
        f"try:\n    RunDir({str(run.root)!r}).lock().__enter__()\nexcept AlignXError as e:\n    print(e); sys.exit(3)\n"
    )
    with run.lock():
        busy = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert busy.returncode == 3 and "in use by alignx pid" in busy.stdout
    free = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert free.returncode == 0


def test_manifest_updates_merge_sections(tmp_path):
    run = RunDir(tmp_path)
    run.update_manifest(splits={"helpful": {"rows": 3}})
    run.update_manifest(splits={"honest": {"rows": 2}}, alignx_version="x")
    assert run.read_manifest() == {"splits": {"helpful": {"rows": 3}, "honest": {"rows": 2}}, "alignx_version": "x"}
