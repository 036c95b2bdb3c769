"""Baselines with artifacts of their own, and the weight-only ones, through `alignx generate`."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import model_with_code, shared_run

from alignx.axes import AXES
from alignx.baselines import merge_ties
from alignx.cli import main
from alignx.errors import AlignXError
from alignx.generate import AlignX
from alignx.run import RunDir
from alignx.stage1.task_vector import adapter_config, task_vector


def _cli(*args):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "alignx", *args], capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def run(tiny_stage2_run):
    done = _cli("baseline", "--run", tiny_stage2_run.run_dir, "--method", "sft-mix,sft-sequential,merge-ties")
    assert done.returncode == 0, done.stderr[-2000:]
    return RunDir(tiny_stage2_run.run_dir)


def test_sft_mix_trains_on_all_axes_with_the_experts_budget(run):
    log = [json.loads(line) for line in run.train_log_path("sft-mix").read_text().splitlines()]
    expert_steps = sum(json.loads(run.summary_path(axis).read_text())["steps"] for axis in AXES)
    assert len(log) == expert_steps == 3
    assert run.has_adapter("sft-mix")


def test_merge_ties_is_a_trimmed_sign_consistent_merge(run):
    config = adapter_config(run.adapter_dir("merge-ties"))
    # r1 + r2 + r3 = 48, capped by the tiny model's smallest projection (k/v: 32 outputs)
    assert config["r"] == min(sum(adapter_config(run.adapter_dir(axis))["r"] for axis in AXES), 32)
    merged = task_vector(run.adapter_dir("merge-ties"))
    experts = [task_vector(run.adapter_dir(axis)) for axis in AXES]
    key = next(iter(merged))
    average = sum(e[key] for e in experts) / 3
    assert merged.keys() == experts[0].keys()
    assert not torch.allclose(merged[key], average, atol=1e-6)  # TIES is not the plain average


def test_sft_sequential_stacks_each_axis_on_the_previous_ones(run):
    from alignx.baselines.sft_sequential import STAGES

    assert all(run.has_adapter(stage) for stage in STAGES)
    vectors = [task_vector(run.adapter_dir(stage)) for stage in STAGES]
    key = next(iter(vectors[0]))
    assert not torch.allclose(vectors[0][key], vectors[1][key])
    result = AlignX.from_run(run.root, method="sft-sequential").generate(["Hi there"], max_new_tokens=2)[0]
    assert result.weights == {stage: 1.0 for stage in STAGES}  # all three stages applied together


@pytest.mark.parametrize("method", ["sft-mix", "merge-ties", "trinityx"])
def test_baselines_generate(run, method):
    results = AlignX.from_run(run.root, method=method).generate(["How do I stay healthy?"], max_new_tokens=3)
    assert results[0].method == method
    if method == "trinityx":
        weights = json.loads((run.root / "stage2" / "trinityx.json").read_text())["weights"]
        assert results[0].weights == pytest.approx(weights, abs=1e-5) and sum(weights.values()) == pytest.approx(1, abs=1e-4)
    else:
        assert results[0].weights == {method: 1.0}


def test_unknown_baseline_is_explained(run):
    bad = _cli("baseline", "--run", str(run.root), "--method", "sft-magic")
    assert bad.returncode == 2 and "valid: sft-mix, sft-sequential, merge-ties" in bad.stderr
    with pytest.raises(AlignXError, match="unknown method"):
        AlignX.from_run(run.root, method="moe-dense")


def test_a_baseline_never_runs_the_code_of_a_runs_model(tiny_stage2_run, tmp_path, tiny_model_dir, monkeypatch, capsys):
    """`alignx baseline --run <a downloaded export>` cannot run the export's code: a run whose config.yaml asks
    for its model's code is refused in one line until --trust-remote-code, and --model loads the base model from
    where the user says. (It used to load the run's model with the run's own trust_remote_code.)"""
    model, mark = model_with_code(tiny_model_dir, tmp_path)
    asking = shared_run(tiny_stage2_run.run_dir, tmp_path / "asking", name=str(model), trust_remote_code=True)
    elsewhere = shared_run(tiny_stage2_run.run_dir, tmp_path / "elsewhere", name="/home/its-author/models/tiny-llama")
    for run in (asking, elsewhere):
        shutil.rmtree(RunDir(run).adapter_dir("merge-ties").parent, ignore_errors=True)
    assert main(["baseline", "--run", str(asking), "--method", "merge-ties"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith(f"alignx: error: {asking} asks to run the code of its base model")
    assert "--trust-remote-code" in error and not mark.exists() and not RunDir(asking).has_adapter("merge-ties")

    assert main(["baseline", "--run", str(elsewhere), "--method", "merge-ties", "--model", str(tiny_model_dir)]) == 0
    assert RunDir(elsewhere).has_adapter("merge-ties")

    loads = []

    def load(config, **kwargs):  # what the baseline would load; nothing remote is loaded here
        loads.append((config.name, config.trust_remote_code))
        raise AlignXError("stopped at the base model")

    monkeypatch.setattr(merge_ties, "load_base_model", load)
    assert main(["baseline", "--run", str(asking), "--method", "merge-ties", "--trust-remote-code"]) == 2
    assert loads == [(str(model), True)] and not mark.exists()
