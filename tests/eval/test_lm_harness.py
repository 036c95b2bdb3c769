"""AlignX inside lm-evaluation-harness, offline, on a tiny run: lm-eval's own TruthfulQA MC2 task definition
through the `alignx` model gives `alignx eval`'s MC2 on the same questions."""

import json

import pytest

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from alignx.eval.benchmarks import BENCHMARKS, benchmark_items  # noqa: E402
from alignx.eval.lm_harness import AlignXLM, routing_text  # noqa: E402
from alignx.eval.truthfulqa_mc import mc_context, score_question  # noqa: E402
from alignx.generate import AlignX  # noqa: E402
from alignx.models.precision import autocast  # noqa: E402


def test_a_few_shot_context_is_routed_on_what_it_asks():
    assert routing_text(mc_context("Why is the sky blue?")) == "Why is the sky blue?"
    assert routing_text("Translate: one\n\nTranslate: two") == "Translate: two"
    assert routing_text("Q: a\nA: b\n\nQ: c\nA:", route="context") == "Q: a\nA: b\n\nQ: c\nA:"


def test_truthfulqa_mc2_through_lm_eval_matches_alignx_eval(tiny_stage2_run, tmp_path):
    items = benchmark_items("truthfulqa_mc", tiny_stage2_run.data, tiny_stage2_run.eval)[:4]
    aligner = AlignX.from_run(tiny_stage2_run.run_dir)  # method alignx: every question routed
    ours = []
    for item in items:  # as alignx eval scores MC (runner._run_mc)
        weights, _ = aligner.weights_for([item["prompt"]], [BENCHMARKS["truthfulqa_mc"].oracle_axis])
        with aligner.experts(weights), autocast(aligner.precision, "cpu"):
            ours.append(score_question(aligner.loaded.model, aligner.loaded.tokenizer, item)["mc2"])
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps({
        "question": item["prompt"],
        "mc1_targets": {"choices": list(item["mc1_targets"]), "labels": list(item["mc1_targets"].values())},
        "mc2_targets": {"choices": list(item["mc2_targets"]), "labels": list(item["mc2_targets"].values())},
    }) + "\n" for item in items))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "local_mc2.yaml").write_text(  # lm-eval's own task, only the data source swapped for a local file
        f"include: {lm_eval.__path__[0]}/tasks/truthfulqa/truthfulqa_mc2.yaml\ntask: local_truthfulqa_mc2\ntag: []\n"
        f"dataset_path: json\ndataset_name: null\ndataset_kwargs:\n  data_files:\n    validation: {data}\n")
    results = lm_eval.simple_evaluate(model="alignx", model_args=f"run={tiny_stage2_run.run_dir},method=alignx",
                                      tasks=["local_truthfulqa_mc2"], task_manager=TaskManager(include_path=str(tasks)))
    assert results["results"]["local_truthfulqa_mc2"]["acc,none"] == pytest.approx(sum(ours) / len(ours), abs=1e-6)


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
