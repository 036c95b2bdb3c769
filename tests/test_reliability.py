"""Reliability: a Stage 1 run killed with SIGKILL resumes to the same weights; damaged artifacts are named."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from alignx.errors import AlignXError
from alignx.run import RunDir, atomic_save_safetensors, load_safetensors


def _stage1(run_dir, model_dir, data_dir, *extra):
    return [
        sys.executable, "-m", "alignx", "stage1", "--axes", "honest", "--model", str(model_dir), f"run_dir={run_dir}",
        f"data.data_dir={data_dir}", "data.max_rows_per_axis=24", "model.precision=fp32", "train.max_steps=40",
        "train.batch_size=2", "train.save_every=2", "train.max_length=384", "features.max_length=64", *extra,
    ]


def test_kill_9_during_stage1_then_resume_matches_an_uninterrupted_run(tmp_path, tiny_model_dir, data_dir):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    straight = subprocess.run(_stage1(tmp_path / "a", tiny_model_dir, data_dir), capture_output=True, text=True, env=env, timeout=300)
    assert straight.returncode == 0, straight.stderr[-2000:]

    log = RunDir(tmp_path / "b").train_log_path("honest")
    victim = subprocess.Popen(_stage1(tmp_path / "b", tiny_model_dir, data_dir), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 240
    while time.time() < deadline and (not log.is_file() or len(log.read_text().splitlines()) < 5):
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)  # no chance to clean up: whatever is on disk is what a crash leaves
    victim.wait()
    steps_done = len(log.read_text().splitlines())
    assert 5 <= steps_done < 40, "the kill must land mid-training"

    refused = subprocess.run(_stage1(tmp_path / "b", tiny_model_dir, data_dir), capture_output=True, text=True, env=env, timeout=300)
    assert refused.returncode == 2 and "--resume" in refused.stderr
    resumed = subprocess.run(_stage1(tmp_path / "b", tiny_model_dir, data_dir) + ["--resume"], capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    a = load_file(RunDir(tmp_path / "a").adapter_dir("honest") / "adapter_model.safetensors")
    b = load_file(RunDir(tmp_path / "b").adapter_dir("honest") / "adapter_model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 41))  # the log was cut back and continued, no gaps or repeats


def test_banks_from_another_base_model_are_refused(tiny_stage2_run):
    from alignx.stage2.pipeline import run_stage2

    run = RunDir(tiny_stage2_run.run_dir)
    path = run.features_path("helpful")
    tensors, metadata = load_safetensors(path)
    original = path.read_bytes()
    try:
        atomic_save_safetensors(tensors, path, {**metadata, "base_weights_sha256": "0" * 64})
        with pytest.raises(AlignXError, match="another base model"):
            run_stage2(tiny_stage2_run, force=True)
    finally:
        path.write_bytes(original)
