"""`alignx export`: the hub layout, its model card, and loading it back (AlignX.from_pretrained, PEFT)."""

import dataclasses
import json
import shutil

import huggingface_hub
import numpy as np
import pytest
import torch

from alignx.axes import AXES
from alignx.cli import main
from alignx.errors import AlignXError
from alignx.eval.judges import Judge
from alignx.eval.runner import run_eval
from alignx.export import MARKER, export_run, resolve_pretrained
from alignx.generate import AlignX
from alignx.run import RunDir

PROMPTS = ["How do I bake bread?", "Is the moon made of cheese?"]


class HalfJudge(Judge):
    def __init__(self, task):
        self.task, self.spec = task, f"test-half-{task}"

    def score(self, items):
        return np.full(len(items), 0.5)


@pytest.fixture(scope="module")
def evaluated_run(tiny_stage2_run, tmp_path_factory):
    """A copy of the tiny run with an `alignx eval` of the base model, so its export carries results."""
    root = tmp_path_factory.mktemp("export") / "run"
    shutil.copytree(tiny_stage2_run.run_dir, root, ignore=shutil.ignore_patterns("run.lock"))
    config = dataclasses.replace(
        RunDir(root).load_config([f"run_dir={root}"]),
        eval=dataclasses.replace(tiny_stage2_run.eval, quick_items=2, max_new_tokens=2, batch_size=2, bootstrap=20,
                                 axis_collapse=False))
    run_eval(RunDir(root), config, ["base"], judges={t: HalfJudge(t) for t in ("safety", "truth", "info", "helpfulness", "refusal")},
             log=lambda *_: None)
    return RunDir(root)


def test_export_writes_the_hub_layout_and_a_model_card(evaluated_run, tmp_path):
    output = export_run(evaluated_run, tmp_path / "export")
    for axis in AXES:
        assert (output / "experts" / axis / "adapter" / "adapter_model.safetensors").is_file()
        assert (output / "experts" / axis / "summary.json").is_file()
        assert not (output / "experts" / axis / "checkpoints").exists()  # training state stays behind
    assert (output / "stage2" / "alignx" / "mocae.safetensors").is_file()
    assert (output / "stage2" / "trinityx.json").is_file()
    assert not (output / "features").exists()
    card = (output / "README.md").read_text()
    assert card.startswith("---\nbase_model: ") and "library_name: peft" in card
    assert "Measured results (`alignx eval`, quick suite)" in card and "| base |" in card
    assert "Judges (held-out accuracy" in card and "test-half-safety" in card
    for axis in AXES:
        assert f"| {axis} | " in card  # the training table: rows, steps, final loss per expert


def test_an_export_loads_back_and_generates_as_the_run_does(evaluated_run, tmp_path):
    output = export_run(evaluated_run, tmp_path / "export")
    original = AlignX.from_run(evaluated_run.root)
    exported = AlignX.from_pretrained(output)
    assert [g.response for g in exported.generate(PROMPTS, max_new_tokens=4)] == \
        [g.response for g in original.generate(PROMPTS, max_new_tokens=4)]
    assert torch.equal(exported.weights_for(PROMPTS)[0], original.weights_for(PROMPTS)[0])


def test_each_exported_expert_loads_alone_in_peft(evaluated_run, tmp_path, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    output = export_run(evaluated_run, tmp_path / "export")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = PeftModel.from_pretrained(base, str(output / "experts" / "honest" / "adapter"))
    assert any("lora_A" in name for name, _ in model.named_parameters())


def test_export_replaces_only_an_earlier_export_of_its_own_files(evaluated_run, tmp_path):
    output = export_run(evaluated_run, tmp_path / "export")
    marker = json.loads((output / MARKER).read_text())
    assert marker["format"] == "alignx-export" and "experts/honest/adapter/adapter_model.safetensors" in marker["files"]
    (output / "README.md").write_text("edited")  # a file the export wrote: replaced
    export_run(evaluated_run, output)
    assert (output / "README.md").read_text().startswith("---\nbase_model: ")
    (output / "stale.txt").write_text("mine, added since")
    with pytest.raises(AlignXError, match=r"earlier export but holds files it did not write \(stale.txt\)"):
        export_run(evaluated_run, output)
    assert (output / "stale.txt").read_text() == "mine, added since"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (export_run(evaluated_run, empty) / MARKER).is_file()
    with pytest.raises(AlignXError, match="not an AlignX run"):
        export_run(RunDir(tmp_path / "nothing"), tmp_path / "out")


def test_export_never_writes_over_a_users_directory(evaluated_run, tmp_path):
    project = tmp_path / "project"  # a project of the user's, config.yaml and all
    (project / "src").mkdir(parents=True)
    for name, text in (("config.yaml", "mine: true\n"), ("src/main.py", "print('mine')\n"), ("notes.txt", "mine\n")):
        (project / name).write_text(text)
    with pytest.raises(AlignXError, match="is not empty and is not an AlignX export"):
        export_run(evaluated_run, project)
    assert sorted(p.relative_to(project).as_posix() for p in project.rglob("*")) == \
        ["config.yaml", "notes.txt", "src", "src/main.py"]
    (project / "file").write_text("x")
    with pytest.raises(AlignXError, match="is a file or a link"):
        export_run(evaluated_run, project / "file")


def test_export_never_writes_over_or_above_its_own_run(evaluated_run, tmp_path):
    holder = tmp_path / "holder"
    shutil.copytree(evaluated_run.root, holder / "run")
    (holder / "config.yaml").write_text("mine: true\n")
    run = RunDir(holder / "run")
    with pytest.raises(AlignXError, match="is the run itself"):
        export_run(run, run.root)
    with pytest.raises(AlignXError, match="is a directory holding the run"):
        export_run(run, holder)
    assert run.has_adapter("honest") and (holder / "config.yaml").is_file()


def test_a_hub_download_fetches_only_the_files_of_an_export_at_the_revision_given(monkeypatch, tmp_path):
    from huggingface_hub.utils import filter_repo_objects

    repository = ["README.md", MARKER, "config.yaml", "manifest.json", "experts/honest/adapter/adapter_config.json",
                  "experts/honest/adapter/adapter_model.safetensors", "experts/honest/summary.json",
                  "stage2/alignx/mocae.json", "stage2/alignx/mocae.safetensors", "stage2/trinityx.json",
                  "modeling_evil.py", "pytorch_model.bin", "experts/honest/adapter/adapter_model.bin", "setup.sh"]
    calls = []

    def snapshot_download(repo_id, revision=None, allow_patterns=None, **kwargs):
        calls.append((repo_id, revision, sorted(filter_repo_objects(repository, allow_patterns=allow_patterns))))
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    assert resolve_pretrained("someone/alignx-export", revision="0123abcd") == tmp_path
    repo_id, revision, fetched = calls[0]
    assert (repo_id, revision) == ("someone/alignx-export", "0123abcd")
    assert fetched == sorted(repository[:10])  # no code, no pickles
    with pytest.raises(AlignXError, match="a revision is for a hub repository id"):
        resolve_pretrained(tmp_path, revision="0123abcd")


def test_the_cli_exports_and_a_missing_hub_repository_is_explained(evaluated_run, tmp_path, capsys):
    assert main(["export", "--run", str(evaluated_run.root), "--output", str(tmp_path / "cli")]) == 0
    assert (tmp_path / "cli" / "README.md").is_file()
    with pytest.raises(AlignXError, match="hub is offline"):
        resolve_pretrained("nobody/no-such-alignx-export")
    with pytest.raises(AlignXError, match="neither an export directory nor a hub repository id"):
        resolve_pretrained(tmp_path / "missing" / "deeper" / "path")
