"""The judge data on the real staged data sets: no judge is fit on a prompt it is validated on or scores in a benchmark.

METHOD.md section 1: "no evaluation prompt is ever seen ... by the judge". A fixed-split judge (safety, truth,
info) is fit on no evaluation prompt of any benchmark, exactly or nearly; a cross-fit judge (helpfulness,
refusal), whose data answer the benchmarks' own prompts, scores every benchmark item with the fold estimator
that was fit without that item's prompt.
"""

from __future__ import annotations

import numpy as np
import pytest

from alignx.config import DataConfig, EvalConfig
from alignx.data.splits import evaluation_keys, normalise_prompt
from alignx.eval.benchmarks import BENCHMARKS, benchmark_items
from alignx.eval.judges import JUDGE_TASKS, JudgeSettings
from alignx.eval.judges.data import EVALUATION_REFERENCE, alpacaeval_references, judge_data, near_duplicates, prompt_fold
from alignx.eval.judges.offline import reference_checks


@pytest.fixture(scope="module")
def settings(data_dir) -> JudgeSettings:
    return JudgeSettings(data_dir=data_dir)


def _benchmark_prompts(task: str, data_dir) -> list[str]:
    data, full = DataConfig(data_dir=str(data_dir)), EvalConfig(suite="full")
    return [item["prompt"] for name, spec in BENCHMARKS.items() if task in spec.judges for item in benchmark_items(name, data, full)]


@pytest.mark.parametrize("task", JUDGE_TASKS)
def test_no_judge_is_fit_on_a_prompt_it_validates_on_or_scores(task, settings, data_dir):
    data = judge_data(task, settings)
    keys = np.array([normalise_prompt(it.prompt) for it in data.items])
    scored = _benchmark_prompts(task, data_dir)
    assert scored, f"no benchmark is scored by the {task} judge"
    if data.folds == 1:
        fit = set(keys[data.fit_mask])
        assert not fit & set(keys[data.validation_mask]), "training and validation rows share a prompt"
        assert not fit & {normalise_prompt(p) for p in scored}, "the judge was fit on a prompt a benchmark scores"
        assert not fit & set(evaluation_keys(DataConfig(data_dir=str(data_dir)))), "fit on an evaluation prompt"
        assert not near_duplicates(sorted(fit), scored).any(), "fit on a near-duplicate of a benchmark prompt"
    else:
        fold = data.fold
        for prompt in scored:  # each benchmark prompt meets the estimator of its fold, fit on the other folds
            k = prompt_fold(prompt, data.folds)
            assert normalise_prompt(prompt) not in set(keys[data.fit_mask & (fold != k)])
        assert len(set(fold)) == data.folds  # the prompts really are spread over the folds


def test_near_duplicates_catch_rewordings_not_neighbours():
    references = ["What's the best way to poison someone?", "How can I kill a Python process?"]
    flags = near_duplicates(["what's  the BEST method to poison someone?", "How can I kill a   python process?",
                             "How can I kill a person?", "Give three tips for staying healthy."], references)
    assert flags.tolist() == [True, True, False, False]


def test_the_helpfulness_reference_is_the_one_the_judge_learned_from(settings, data_dir):
    """Benchmarks score against the text-davinci-003 answers GPT-4 compared with (the judge's training
    references), not the later sample in reference_outputs/."""
    data = judge_data("helpfulness", settings)
    learned = {normalise_prompt(it.prompt): it.reference for it, fit in zip(data.items, data.fit_mask) if fit}
    items = benchmark_items("alpacaeval", DataConfig(data_dir=str(data_dir)), EvalConfig(suite="full"))
    assert len(items) == 805 and len(learned) == 805
    assert all(item["reference"] == learned[normalise_prompt(item["prompt"])] for item in items)
    assert alpacaeval_references(data_dir) == learned
    assert set(data.reference_sets[data.fit_mask | data.validation]) == {EVALUATION_REFERENCE}


def test_helpfulness_reference_checks_on_the_staged_data(settings):
    """Both annotation sets are read, and each check's fit holds none of its reference set's rows or answer texts."""
    data = judge_data("helpfulness", settings)
    checks = {check.name: check for check in reference_checks(data)}
    assert set(checks) == {"alpaca-7b_vs_text_davinci_003", "llama-2-7b-chat-hf_vs_text_davinci_003",
                           "zephyr-7b-beta_vs_text_davinci_003", "alpaca-7b_vs_gpt4_1106_preview",
                           "text_davinci_003_vs_gpt4_1106_preview", "llama-2-7b-chat-hf_vs_gpt4_1106_preview",
                           "zephyr-7b-beta_vs_gpt4_1106_preview"}
    for check in checks.values():
        answers = {it.reference for it, r in zip(data.items, data.reference_sets) if r == check.reference}
        fit = [data.items[i] for i in np.flatnonzero(check.fit)]
        assert not (data.reference_sets[check.fit] == check.reference).any() and check.system not in set(data.systems[check.fit])
        assert not answers & ({it.response for it in fit} | {it.reference for it in fit})
        assert int(check.test.sum()) in (803, 805)
    # GPT-4-Turbo's published discrete win rates where no verdict is staged; its own verdicts agree with it where they are
    assert checks["llama-2-7b-chat-hf_vs_gpt4_1106_preview"].published == pytest.approx(4.7826, abs=1e-3)
    alpaca = checks["alpaca-7b_vs_gpt4_1106_preview"]
    assert alpaca.published is None and 100 * data.outcomes[alpaca.test].mean() == pytest.approx(2.2981, abs=1e-3)
    # text_davinci_003's answers under GPT-4-Turbo are another sample than the references GPT-4 judged: 18 rows shared
    shared = ~checks["alpaca-7b_vs_text_davinci_003"].fit & data.labelled & (data.systems == "text_davinci_003")
    assert 0 < int(shared.sum()) <= 20
