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
        # both trainings ran here, on one CPU and one code path: a resume must reproduce the uninterrupted run
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


def _wait_for(predicate, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline and not predicate():
        time.sleep(0.05)
    return predicate()


def _copy_run(config, tmp_path, *leave_out):
    """A private copy of a tiny session run without ``leave_out`` (so a test cannot disturb other tests)."""
    import shutil

    target = tmp_path / "run"
    shutil.copytree(config.run_dir, target, ignore=shutil.ignore_patterns("eval", "*.lock", *leave_out))
    return target


def test_kill_9_during_stage2_then_rerun_finishes_and_keeps_what_was_done(tmp_path, tiny_stage1_run):
    run_dir = _copy_run(tiny_stage1_run, tmp_path, "stage2")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    command = [sys.executable, "-m", "alignx", "stage2", "--run", str(run_dir)]
    victim = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    assert _wait_for(lambda: (run_dir / "stage2").is_dir())
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (run_dir / "stage2" / "report.json").is_file(), "the kill must land before Stage 2 finishes"
    again = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    report = json.loads((run_dir / "stage2" / "report.json").read_text())
    assert {"alignx", "moe-uncalibrated"} <= set(report["routers"])
    third = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert third.returncode == 0 and "already" in (third.stdout + third.stderr).lower()  # finished work is not redone


_EVAL_SCRIPT = """
import sys, numpy as np
from alignx.config import load_config
from alignx.eval.judges import Judge
from alignx.eval.runner import run_eval
from alignx.run import RunDir

class Constant(Judge):
    def __init__(self, task): self.task, self.spec = task, "constant"
    def score(self, items): return np.full(len(items), 0.7)

run = RunDir(sys.argv[1])
config = run.load_config(["eval.quick_items=12", "eval.max_new_tokens=24", "eval.batch_size=2", "eval.bootstrap=20"])
run_eval(run, config, ["base"], judges={t: Constant(t) for t in ("safety", "truth", "info", "helpfulness", "refusal")})
"""


def test_kill_9_during_eval_then_rerun_generates_only_what_is_missing(tmp_path, tiny_stage2_run):
    from alignx.eval.runner import eval_paths, read_jsonl

    run = RunDir(_copy_run(tiny_stage2_run, tmp_path))
    paths = eval_paths(run, "quick")
    first = paths.generations("base", "alpacaeval")
    script = tmp_path / "eval_script.py"
    script.write_text(_EVAL_SCRIPT)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    victim = subprocess.Popen([sys.executable, str(script), str(run.root)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env=env)
    assert _wait_for(lambda: len(read_jsonl(first)) >= 2)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    before = {row["id"]: row["response"] for row in read_jsonl(first)}
    assert 2 <= len(before) < 12, "the kill must land mid-generation"
    done = subprocess.run([sys.executable, str(script), str(run.root)], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = read_jsonl(first)
    assert len(rows) == len({r["id"] for r in rows}) == 12  # every item once: nothing redone, nothing lost
    assert all(r["response"] == before[r["id"]] for r in rows if r["id"] in before)
    assert paths.results.is_file()
