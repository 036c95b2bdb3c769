"""`alignx stage2` end to end on a tiny Stage 1 run over small slices of the real data."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import model_with_code, shared_run

from alignx.cli import main
from alignx.errors import AlignXError
from alignx.stage2 import pipeline
from alignx.stage2.mocae import MoCaE
from alignx.stage2.pipeline import run_stage2, stage2_dir


@pytest.fixture(scope="module")
def stage1_run(tiny_stage1_run):
    return tiny_stage1_run


def test_stage2_trains_the_default_the_baseline_and_the_papers_combination_and_reports(stage1_run):
    out = run_stage2(stage1_run, log=lambda *_: None)
    report = json.loads((out / "report.json").read_text())
    assert set(report["routers"]) == {"alignx", "moe-uncalibrated", "paper"}
    paper = MoCaE.load(out / "paper").config
    assert (paper.combination, paper.lambda_fractal, paper.lambda_natural, paper.dimension_weight) == ("mixture", 0.6, 0.4, 0.0)
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
    import dataclasses

    run_stage2(stage1_run, log=lambda *_: None)  # finished: the routers exist for these banks and settings
    # the same run and Stage 2 settings (overrides kept), another data split: refused, not skipped
    changed = dataclasses.replace(stage1_run, data=dataclasses.replace(stage1_run.data, max_rows_per_axis=40))
    with pytest.raises(AlignXError, match="different .* data split"):
        run_stage2(changed, log=lambda *_: None)


def test_changed_bank_files_are_refitted_not_skipped(stage1_run, tmp_path):
    import dataclasses
    import shutil

    from alignx.run import RunDir, atomic_save_safetensors, load_safetensors

    run_stage2(stage1_run, log=lambda *_: None)
    copy = tmp_path / "run"
    shutil.copytree(stage1_run.run_dir, copy)
    config = dataclasses.replace(stage1_run, run_dir=str(copy))
    lines = []
    run_stage2(config, log=lines.append)
    assert any("skipping" in line for line in lines)  # the same banks: nothing to do
    before = json.loads((copy / "stage2" / "alignx" / "mocae.json").read_text())["fitted_from"]
    # the harmless bank rebuilt (say, by another precision): same split, same rows, other features
    path = RunDir(copy).features_path("harmless")
    tensors, meta = load_safetensors(path)
    atomic_save_safetensors({k: v + 0.01 * torch.randn_like(v) for k, v in tensors.items()}, path, meta)
    lines.clear()
    run_stage2(config, log=lines.append)
    assert not any("skipping" in line for line in lines)
    after = json.loads((copy / "stage2" / "alignx" / "mocae.json").read_text())["fitted_from"]
    assert after["banks_sha256"]["harmless"] != before["banks_sha256"]["harmless"]
    assert after["banks_sha256"]["helpful"] == before["banks_sha256"]["helpful"]


def test_evaluation_features_are_recomputed_when_what_they_depend_on_changes(stage1_run):
    import dataclasses

    from alignx.run import RunDir, load_safetensors
    from alignx.stage2.pipeline import evaluation_features, evaluation_prompts_of, load_banks

    run = RunDir(stage1_run.run_dir)
    banks = load_banks(run, stage1_run)
    prompts, labels = evaluation_prompts_of(stage1_run)
    assert banks.max_length == stage1_run.features.max_length == 64
    router, _, _ = evaluation_features(run, stage1_run, banks, prompts, labels, log=lambda *_: None)
    path = stage2_dir(run) / "eval_features.safetensors"
    for key, value in (("max_length", "16"), ("base_weights_sha256", "0" * 64), ("precision", "bfloat16")):
        changed = dataclasses.replace(banks, settings={**banks.settings, key: value})
        again, _, _ = evaluation_features(run, stage1_run, changed, prompts, labels, log=lambda *_: None)
        assert load_safetensors(path)[1][key] == value  # recomputed under the new settings, not reused
    shorter, _, _ = evaluation_features(run, stage1_run, dataclasses.replace(banks, settings={**banks.settings, "max_length": "16"}),
                                        prompts, labels, log=lambda *_: None)
    assert not torch.allclose(shorter, router)  # truncation really changes the features of long prompts
    restored, _, _ = evaluation_features(run, stage1_run, banks, prompts, labels, log=lambda *_: None)
    assert torch.equal(restored, router)


def test_a_router_narrower_than_the_features_projects_on_principal_directions(stage1_run):
    import dataclasses

    narrow = dataclasses.replace(stage1_run, stage2=dataclasses.replace(stage1_run.stage2, name="narrow", router_hidden=16))
    out = run_stage2(narrow, log=lambda *_: None)
    model = MoCaE.load(out / "narrow")
    assert model.router.phi.weight.shape == (16, 64)  # the tiny models' hidden size 64 > router_hidden 16
    # (that φ starts at the principal directions and the router at the regression on them: tests/stage2/test_router.py)
    assert json.loads((out / "report.json").read_text())["routers"]["narrow"]["after_output_calibration"]["n"] == 60


def test_auto_calibration_records_its_nested_choice(stage1_run):
    import dataclasses

    from alignx.stage2.crossfit import CANDIDATES

    auto = dataclasses.replace(stage1_run, stage2=dataclasses.replace(stage1_run.stage2, name="auto-cal", calibration="auto"))
    out = run_stage2(auto, log=lambda *_: None)
    done = json.loads((out / "report.json").read_text())["routers"]["auto-cal"]["output_calibration"]
    assert done["method"] in CANDIDATES and "nested_selection" in done
    if done["nested_selection"] is not None:  # the tiny banks may be too small to nest: then cross-fit
        assert done["method"] == min(done["nested_selection"], key=lambda name: done["nested_selection"][name]["nll"])


def test_stage2_loads_a_runs_base_model_only_as_the_user_says(stage1_run, tmp_path, tiny_model_dir, monkeypatch, capsys):
    """`alignx stage2 --run <someone else's run>` never runs the code of the model its config.yaml names: a run
    asking for it is refused in one line, before any work, until --trust-remote-code; --model loads the base
    model from where the user says. (It used to load the run's model with the run's own trust_remote_code.)"""
    model, mark = model_with_code(tiny_model_dir, tmp_path)
    asking = shared_run(stage1_run.run_dir, tmp_path / "asking", name=str(model), trust_remote_code=True)
    elsewhere = shared_run(stage1_run.run_dir, tmp_path / "elsewhere", name="/home/its-author/models/tiny-llama")
    for run in (asking, elsewhere):  # no cached features: Stage 2 loads the base model for the evaluation prompts
        shutil.rmtree(run / "stage2", ignore_errors=True)
    assert main(["stage2", "--run", str(asking)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith(f"alignx: error: {asking} asks to run the code of its base model")
    assert "--trust-remote-code" in error and not mark.exists() and not (asking / "stage2").exists()

    loads = []

    def load(config, **kwargs):  # what Stage 2 would load; nothing remote is loaded here
        loads.append((config.name, config.trust_remote_code))
        raise AlignXError("stopped at the base model")

    monkeypatch.setattr(pipeline, "load_base_model", load)
    assert main(["stage2", "--run", str(asking), "--trust-remote-code"]) == 2
    assert main(["stage2", "--run", str(elsewhere), "--model", str(tiny_model_dir)]) == 2
    assert loads == [(str(model), True), (str(tiny_model_dir), False)] and not mark.exists()
