"""AlignX inside lm-evaluation-harness, offline, on a tiny run: lm-eval's own TruthfulQA MC2 task definition
through the `alignx` model gives `alignx eval`'s MC2 on the same questions, in Python and through the documented
`alignx lm-eval` line."""

import json
import logging
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import shared_run

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from alignx.cli import main  # noqa: E402
from alignx.errors import AlignXError  # noqa: E402
from alignx.eval.benchmarks import BENCHMARKS, benchmark_items  # noqa: E402
from alignx.eval.lm_eval_cli import EXAMPLE  # noqa: E402
from alignx.eval.lm_harness import AlignXLM, routing_text  # noqa: E402
from alignx.eval.truthfulqa_mc import mc_context, score_question  # noqa: E402
from alignx.generate import AlignX  # noqa: E402
from alignx.models.precision import autocast  # noqa: E402


def test_a_few_shot_context_is_routed_on_what_it_asks():
    assert routing_text(mc_context("Why is the sky blue?")) == "Why is the sky blue?"
    assert routing_text("Translate: one\n\nTranslate: two") == "Translate: two"
    assert routing_text("Q: a\nA: b\n\nQ: c\nA:", route="context") == "Q: a\nA: b\n\nQ: c\nA:"


def _alignx_eval_mc2(run_dir, items) -> float:
    """The mean MC2 of ``items`` as `alignx eval` scores MC (runner._run_mc), method alignx: every question routed."""
    aligner = AlignX.from_run(run_dir)
    scores = []
    for item in items:
        weights, _ = aligner.weights_for([item["prompt"]], [BENCHMARKS["truthfulqa_mc"].oracle_axis])
        with aligner.experts(weights), autocast(aligner.precision, "cpu"):
            scores.append(score_question(aligner.loaded.model, aligner.loaded.tokenizer, item)["mc2"])
    return sum(scores) / len(scores)


def _local_mc2_task(items, folder: Path, task: str) -> Path:
    """A task folder for --include_path: lm-eval's own truthfulqa_mc2 definition, named ``task``, with only its data
    source swapped for a local file of ``items`` (questions of the staged TruthfulQA), so nothing reads the hub."""
    folder.mkdir()
    data = folder / "mc.jsonl"
    data.write_text("".join(json.dumps({
        "question": item["prompt"],
        "mc1_targets": {"choices": list(item["mc1_targets"]), "labels": list(item["mc1_targets"].values())},
        "mc2_targets": {"choices": list(item["mc2_targets"]), "labels": list(item["mc2_targets"].values())},
    }) + "\n" for item in items))
    (folder / f"{task}.yaml").write_text(
        f"include: {lm_eval.__path__[0]}/tasks/truthfulqa/truthfulqa_mc2.yaml\ntask: {task}\ntag: []\n"
        f"dataset_path: json\ndataset_name: null\ndataset_kwargs:\n  data_files:\n    validation: {data}\n")
    return folder


def test_truthfulqa_mc2_through_lm_eval_matches_alignx_eval(tiny_stage2_run, tmp_path):
    items = benchmark_items("truthfulqa_mc", tiny_stage2_run.data, tiny_stage2_run.eval)[:4]
    tasks = _local_mc2_task(items, tmp_path / "tasks", "local_truthfulqa_mc2")
    results = lm_eval.simple_evaluate(model="alignx", model_args=f"run={tiny_stage2_run.run_dir},method=alignx",
                                      tasks=["local_truthfulqa_mc2"], task_manager=TaskManager(include_path=str(tasks)))
    expected = _alignx_eval_mc2(tiny_stage2_run.run_dir, items)
    assert results["results"]["local_truthfulqa_mc2"]["acc,none"] == pytest.approx(expected, abs=1e-6)


def test_the_documented_lm_eval_line_runs_offline(tiny_stage2_run, tmp_path, capsys):
    """The line of docs/cli.md and `alignx lm-eval --help`, verbatim, run as a user runs it: from a folder where
    runs/mine is a run, offline; only --include_path is added, for a local truthfulqa_mc2 over 3 staged questions."""
    root = Path(__file__).resolve().parents[2]
    assert EXAMPLE in (root / "docs" / "cli.md").read_text()
    with pytest.raises(SystemExit):
        main(["lm-eval", "--help"])
    assert EXAMPLE in capsys.readouterr().out
    assert "--model alignx --model_args run=" in (root / "README.md").read_text()
    items = benchmark_items("truthfulqa_mc", tiny_stage2_run.data, tiny_stage2_run.eval)[:3]
    tasks = _local_mc2_task(items, tmp_path / "tasks", "truthfulqa_mc2")  # overrides lm-eval's hub-backed task
    work = tmp_path / "work"
    (work / "runs").mkdir(parents=True)
    (work / "runs" / "mine").symlink_to(Path(tiny_stage2_run.run_dir).resolve())
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_DATASETS_CACHE=str(tmp_path / "datasets"),
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    alignx = Path(sys.executable).with_name("alignx")  # the console script the install puts beside the interpreter
    argv = shlex.split(EXAMPLE)
    assert argv[0] == "alignx" and alignx.is_file()
    done = subprocess.run([str(alignx), *argv[1:], "--include_path", str(tasks)], cwd=work, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    row = re.search(r"^\|truthfulqa_mc2\s*\|.*?\|acc\s*\|[^|]*\|\s*([0-9.]+)", done.stdout, re.M)
    assert row, done.stdout[-2000:]
    assert float(row.group(1)) == pytest.approx(_alignx_eval_mc2(tiny_stage2_run.run_dir, items), abs=1e-4)


def _lm_eval_in_process(monkeypatch, *argv: str) -> int:
    """`alignx lm-eval ...` in this process. lm-eval makes its log handler once per process, on the stderr of the
    moment: pointed at this test's, a second call does not log into an earlier test's closed capture."""
    for handler in logging.getLogger("lm_eval").handlers:
        if type(handler) is logging.StreamHandler:  # lm-eval's own (pytest's capture handlers sit beside it)
            monkeypatch.setattr(handler, "stream", sys.stderr)
    return main(["lm-eval", *argv])


def test_method_oracle_is_refused_in_one_line(tiny_stage2_run, capsys, monkeypatch):
    """The oracle routes by each prompt's gold axis; lm-eval requests have none (it used to route all to honest)."""
    with pytest.raises(AlignXError, match="method=oracle needs each prompt's gold axis"):
        AlignXLM(run=str(tiny_stage2_run.run_dir), method="oracle")
    code = _lm_eval_in_process(monkeypatch, "--model", "alignx", "--model_args",
                               f"run={tiny_stage2_run.run_dir},method=oracle", "--tasks", "truthfulqa_mc2")
    error = capsys.readouterr().err
    assert code == 2 and "Traceback" not in error  # after lm-eval's own log lines, one line says why and what to use
    assert error.strip().splitlines()[-1].startswith("alignx: error: method=oracle needs each prompt's gold axis")


def test_only_the_users_model_args_let_a_run_load_code_or_move_its_base_model(tiny_stage2_run, tmp_path, tiny_model_dir,
                                                                             capsys, monkeypatch):
    """A run whose config.yaml asks to run its model's code is refused in one line before anything loads; the
    user's trust_remote_code=true (lm-eval's --trust_remote_code adds it) allows it, and model= says where the base
    model is. (Both used to be dropped.) The tiny Llama has no code of its own: nothing remote loads here."""
    asking = shared_run(tiny_stage2_run.run_dir, tmp_path / "asking", trust_remote_code=True)
    with pytest.raises(AlignXError, match="asks to run the code of its base model .* lm-eval's --model_args") as info:
        AlignXLM(run=str(asking), method="expert-honest")
    assert "\n" not in str(info.value)
    code = _lm_eval_in_process(monkeypatch, "--model", "alignx", "--model_args", f"run={asking},method=expert-honest",
                               "--tasks", "truthfulqa_mc2")
    error = capsys.readouterr().err
    assert code == 2 and "Traceback" not in error
    assert error.strip().splitlines()[-1].startswith(f"alignx: error: {asking} asks to run the code of its base model")
    allowed = AlignXLM.create_from_arg_string(f"run={asking},method=expert-honest,trust_remote_code=true")
    assert allowed.aligner.precision.trust_remote_code is True
    with pytest.raises(AlignXError, match="trust_remote_code must be true or false, got 'yes'"):
        AlignXLM.create_from_arg_string(f"run={asking},trust_remote_code=yes")

    elsewhere = shared_run(tiny_stage2_run.run_dir, tmp_path / "elsewhere", name="/home/its-author/models/tiny-llama")
    moved = AlignXLM.create_from_arg_string(f"run={elsewhere},method=expert-honest,model={tiny_model_dir}")
    assert (moved.aligner.precision.name, moved.aligner.precision.trust_remote_code) == (str(tiny_model_dir), False)


def test_generate_until_stops_at_the_first_stop_string(tiny_stage2_run):
    model = AlignXLM(run=str(tiny_stage2_run.run_dir), method="expert-honest")
    request = Instance("generate_until", {}, ("Q: Why is the sky blue?\nA:", {"until": ["e"], "max_gen_toks": 12}), 0)
    free = Instance("generate_until", {}, ("Q: Why is the sky blue?\nA:", {"until": [], "max_gen_toks": 12}), 0)
    cut, whole = model.generate_until([request])[0], model.generate_until([free])[0]
    assert "e" not in cut and whole.startswith(cut)
    scores = model.loglikelihood([Instance("loglikelihood", {}, ("Q: Why?\nA:", " Because."), 0),
                                  Instance("loglikelihood", {}, ("Q: Why?\nA:", " No."), 1)])
    assert len(scores) == 2 and all(isinstance(s, float) and s < 0 and isinstance(g, bool) for s, g in scores)
    assert model.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, ("Some text here.",), 0)])[0] < 0
