"""Stage 1 end to end on four tiny backbones, on small slices of the real data sets."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from alignx.axes import AXES
from alignx.config import load_config
from alignx.errors import AlignXError
from alignx.run import RunDir
from alignx.stage1 import train
from alignx.stage1.pipeline import run_stage1

ARCHS = ("llama", "mistral", "gemma", "qwen2")


def _config(run_dir, model_dir, data_dir, *extra):
    return load_config(
        None,
        [
            f"run_dir={run_dir}", f"model.name={model_dir}", "model.precision=fp32", f"data.data_dir={data_dir}",
            "data.max_rows_per_axis=12", "train.max_steps=2", "train.batch_size=4", "train.max_length=384",
            "features.max_length=64", *extra,
        ],
    )


@pytest.mark.parametrize("arch", ARCHS)
def test_stage1_end_to_end(tmp_path, tiny_model_dirs, data_dir, arch):
    config = _config(tmp_path / "run", tiny_model_dirs[arch], data_dir)
    run = run_stage1(config, log=lambda *_: None)

    adapters = {axis: load_file(run.adapter_dir(axis) / "adapter_model.safetensors") for axis in AXES}
    assert adapters["helpful"].keys() == adapters["harmless"].keys() == adapters["honest"].keys()
    b_keys = [k for k in adapters["helpful"] if "lora_B" in k]
    assert len(b_keys) == 3 * 7  # every attention and MLP projection of the three layers
    for a, b in (("helpful", "harmless"), ("helpful", "honest"), ("harmless", "honest")):
        assert any(not torch.equal(adapters[a][k], adapters[b][k]) for k in b_keys), f"{a} == {b}"

    manifest = json.loads(run.manifest_path.read_text())
    assert manifest["base_model"]["weights_sha256"] and manifest["libraries"]["torch"]
    assert set(manifest["splits"]) == set(AXES) and set(manifest["experts"]) == set(AXES)
    for axis in AXES:
        with safe_open(str(run.features_path(axis)), "pt") as bank:
            router, meta = bank.get_tensor("router"), bank.metadata()
            assert router.shape == (int(meta["num_prompts"]), 64) and torch.isfinite(router).all()
            assert (meta["router_layer"], meta["calibrator_layer"]) == ("1", "2")  # L/2 and 2L/3 of 3 layers
        assert len(run.train_log_path(axis).read_text().splitlines()) == 2


def test_rerun_skips_finished_work_and_refuses_changed_settings(tmp_path, tiny_model_dir, data_dir):
    config = _config(tmp_path / "run", tiny_model_dir, data_dir, "axes=honest")
    run = run_stage1(config, log=lambda *_: None)
    stamp = (run.adapter_dir("honest") / "adapter_model.safetensors").stat().st_mtime_ns
    bank_stamp = run.features_path("honest").stat().st_mtime_ns
    messages = []
    run_stage1(config, log=messages.append)
    assert (run.adapter_dir("honest") / "adapter_model.safetensors").stat().st_mtime_ns == stamp
    assert run.features_path("honest").stat().st_mtime_ns == bank_stamp
    assert any("skipping" in m for m in messages)
    with pytest.raises(AlignXError, match="train.lr"):
        run_stage1(_config(tmp_path / "run", tiny_model_dir, data_dir, "axes=honest", "train.lr=0.5"))


def test_a_stage1_stopped_between_an_expert_and_its_summary_finishes_it_on_rerun(tmp_path, tiny_model_dir, data_dir,
                                                                                 monkeypatch):
    config = _config(tmp_path / "run", tiny_model_dir, data_dir, "axes=honest")
    run = RunDir(config.run_dir)
    real_write = train.atomic_write_json

    def killed_at_the_summary(path, value):
        if path == run.summary_path("honest"):
            raise KeyboardInterrupt
        real_write(path, value)

    monkeypatch.setattr(train, "atomic_write_json", killed_at_the_summary)
    with pytest.raises(KeyboardInterrupt):
        run_stage1(config, log=lambda *_: None)
    monkeypatch.undo()
    run_stage1(config, resume=True, log=lambda *_: None)
    assert run.has_adapter("honest") and run.summary_path("honest").is_file()
    entry = run.read_manifest()["experts"]["honest"]
    assert entry["steps"] == 2 and "encoding_skipped" in entry

    run.summary_path("honest").unlink()  # what a run stopped there by an older alignx left: trained again
    run_stage1(config, log=lambda *_: None)
    assert json.loads(run.summary_path("honest").read_text())["steps"] == 2

    stamp = (run.adapter_dir("honest") / "adapter_model.safetensors").stat().st_mtime_ns
    manifest = run.read_manifest()
    run.update_manifest(experts={"honest": {"encoding_skipped": entry["encoding_skipped"]}})  # stopped before the entry
    run_stage1(config, log=lambda *_: None)
    assert (run.adapter_dir("honest") / "adapter_model.safetensors").stat().st_mtime_ns == stamp  # skipped
    assert run.read_manifest()["experts"]["honest"] == manifest["experts"]["honest"]


def test_concurrent_runs_on_one_directory_are_refused(tmp_path, tiny_model_dir, data_dir):
    config = _config(tmp_path / "run", tiny_model_dir, data_dir, "axes=honest")
    with RunDir(config.run_dir).lock():
        with pytest.raises(AlignXError, match="in use"):
            run_stage1(config)


def _cli(*args, env_data=None):
    import os

    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "alignx", *args], capture_output=True, text=True, env=env, timeout=120)


def test_cli_task_vector_and_user_errors(tmp_path, tiny_model_dir, data_dir):
    config = _config(tmp_path / "run", tiny_model_dir, data_dir, "axes=harmless")
    run_stage1(config, log=lambda *_: None)
    done = _cli("stage1", "task-vector", "--run", str(tmp_path / "run"), "--axis", "harmless")
    assert done.returncode == 0, done.stderr
    vector = load_file(RunDir(tmp_path / "run").task_vector_path("harmless"))
    assert len(vector) == 21 and all(k.endswith(".weight") for k in vector)

    missing = _cli("stage1", "task-vector", "--run", str(tmp_path / "run"), "--axis", "honest")
    assert missing.returncode == 2 and "no trained honest expert" in missing.stderr and "Traceback" not in missing.stderr

    unknown = _cli("stage1", "train.lrr=1", f"run_dir={tmp_path / 'x'}")
    assert unknown.returncode == 2 and "train.lrr" in unknown.stderr and "valid keys" in unknown.stderr
    assert "Traceback" not in unknown.stderr

    no_config = _cli("stage1", "--config", str(tmp_path / "nope.yaml"))
    assert no_config.returncode == 2 and "config file not found" in no_config.stderr

    empty = tmp_path / "empty-data"  # the real data, but a TruthfulQA file with no rows
    (empty / "truthfulqa").mkdir(parents=True)
    for folder in data_dir.iterdir():
        if folder.name != "truthfulqa":
            (empty / folder.name).symlink_to(folder)
    (empty / "truthfulqa" / "TruthfulQA.csv").write_text("Type,Category,Question,Best Answer,Correct Answers,Incorrect Answers,Source\n")
    result = _cli("stage1", "--axes", "honest", f"data.data_dir={empty}", f"model.name={tiny_model_dir}", f"run_dir={tmp_path / 'e'}")
    assert result.returncode == 2 and "honest" in result.stderr and "Traceback" not in result.stderr, result.stderr

    gone = _cli("stage1", "--axes", "honest", f"data.data_dir={tmp_path / 'nowhere'}", f"model.name={tiny_model_dir}", f"run_dir={tmp_path / 'g'}")
    assert gone.returncode == 2 and "ALIGNX_DATA_DIR" in gone.stderr and "Traceback" not in gone.stderr, gone.stderr


def test_accelerate_launch_runs_stage1_data_parallel(tmp_path, tiny_model_dir, data_dir):
    """`accelerate launch --num_processes 2` (gloo on CPU) trains and writes the same adapter format."""
    import os
    import shutil

    launcher = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    assert launcher, "accelerate's launcher is installed with the package"
    args = [
        launcher, "launch", "--cpu", "--num_processes", "2", "--num_cpu_threads_per_process", "1", "-m", "alignx",
        "stage1", "--model", str(tiny_model_dir), "--axes", "honest", f"data.data_dir={data_dir}",
        "data.max_rows_per_axis=16", "train.max_steps=2", "train.batch_size=2", "train.max_length=384",
        "model.precision=fp32", f"run_dir={tmp_path / 'ddp'}",
    ]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("[stage1] done") == 1  # only the main process speaks
    run = RunDir(tmp_path / "ddp")
    adapter = load_file(run.adapter_dir("honest") / "adapter_model.safetensors")
    assert len([k for k in adapter if "lora_B" in k]) == 21 and all(torch.isfinite(v).all() for v in adapter.values())
    log = [json.loads(line) for line in run.train_log_path("honest").read_text().splitlines()]
    assert [row["step"] for row in log] == [1, 2]
    assert run.features_path("honest").is_file()
