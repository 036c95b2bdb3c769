"""`alignx stage2` end to end on a tiny Stage 1 run over small slices of the real data."""

import json
import os
import subprocess
import sys

import pytest

from alignx.config import load_config
from alignx.errors import AlignXError
from alignx.stage2.mocae import MoCaE
from alignx.stage2.pipeline import run_stage2, stage2_dir


@pytest.fixture(scope="module")
def stage1_run(tiny_stage1_run):
    return tiny_stage1_run


def test_stage2_trains_both_routers_and_reports(stage1_run):
    out = run_stage2(stage1_run, log=lambda *_: None)
    report = json.loads((out / "report.json").read_text())
    assert set(report["routers"]) == {"alignx", "moe-uncalibrated"}
    for name, result in report["routers"].items():
        for phase in ("before_output_calibration", "after_output_calibration"):
            metrics = result[phase]
            assert metrics["n"] == 60 and 0 <= metrics["accuracy"] <= 1 and metrics["ece"] >= 0
            assert set(metrics["misrouting"]) == {"helpful", "harmless", "honest"}
    assert report["routers"]["alignx"]["output_temperature"] > 0
    assert "ood_rate" in report["routers"]["alignx"]
    assert (out / "reliability.png").stat().st_size > 1000
    model = MoCaE.load(out / "alignx")
    assert model.fractal is not None and model.natural is not None and model.layers == (1, 2)


def test_cli_runs_an_ablation_and_explains_missing_runs(stage1_run, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    ablation = subprocess.run(
        [sys.executable, "-m", "alignx", "stage2", "--run", stage1_run.run_dir, "stage2.name=no-fractal", "stage2.use_fractal=false"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert ablation.returncode == 0, ablation.stderr[-2000:]
    assert MoCaE.load(stage2_dir_of(stage1_run) / "no-fractal").fractal is None
    report = json.loads((stage2_dir_of(stage1_run) / "report.json").read_text())
    assert {"alignx", "no-fractal", "moe-uncalibrated"} <= set(report["routers"])  # ablations accumulate
    again = subprocess.run(
        [sys.executable, "-m", "alignx", "stage2", "--run", stage1_run.run_dir, "stage2.name=no-fractal", "stage2.use_fractal=false"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert again.returncode == 0 and "skipping" in again.stdout  # nothing finished is redone
    missing = subprocess.run([sys.executable, "-m", "alignx", "stage2", "--run", str(tmp_path / "none")],
                             capture_output=True, text=True, env=env, timeout=120)
    assert missing.returncode == 2 and "alignx stage1" in missing.stderr and "Traceback" not in missing.stderr


def stage2_dir_of(config):
    from alignx.run import RunDir

    return stage2_dir(RunDir(config.run_dir))


def test_banks_from_another_data_split_are_refused(stage1_run):
    changed = load_config(None, [f"{k}={v}" for k, v in {
        "run_dir": stage1_run.run_dir, "model.name": stage1_run.model.name, "data.data_dir": stage1_run.data.data_dir,
        "data.max_rows_per_axis": 40,
    }.items()])
    with pytest.raises(AlignXError, match="different .* data split"):
        run_stage2(changed)
