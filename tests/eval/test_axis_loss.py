"""The axis-loss matrix on a tiny run: teacher-forced NLL per method and axis, the oracle, resuming."""

import pytest
import torch

from alignx.axes import AXES
from alignx.eval import axis_loss
from alignx.eval.axis_loss import axis_loss_matrix, gold_items
from alignx.run import RunDir

METHODS = ["alignx", "oracle", "best-expert", "base", "expert-honest"]


@pytest.fixture(scope="module")
def matrix(tiny_stage2_run):
    return axis_loss_matrix(RunDir(tiny_stage2_run.run_dir), tiny_stage2_run, METHODS, 4, batch_size=3,
                            max_length=1024, resamples=50)


def test_base_loss_is_the_plain_models_teacher_forced_nll(tiny_stage2_run, matrix):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignx.data.formatting import ChatFormatter

    tokenizer = AutoTokenizer.from_pretrained(tiny_stage2_run.model.name)
    model = AutoModelForCausalLM.from_pretrained(tiny_stage2_run.model.name).eval()
    formatter = ChatFormatter(tokenizer)
    total, tokens = 0.0, 0
    for example in gold_items(tiny_stage2_run, 4)["honest"]:  # one at a time, no padding, no experts
        prompt = tokenizer(formatter.prompt_text(example.user_text), add_special_tokens=False)["input_ids"]
        answer = tokenizer(formatter.completion_text(example.response), add_special_tokens=False)["input_ids"]
        ids = torch.tensor([(prompt + answer)[:1024]])
        with torch.no_grad():
            logits = model(ids).logits[0, len(prompt) - 1 : -1]
        total += float(torch.nn.functional.cross_entropy(logits, ids[0, len(prompt):], reduction="sum"))
        tokens += ids.shape[1] - len(prompt)
    assert matrix["matrix"]["base"]["honest"] == pytest.approx(total / tokens, rel=1e-4)


def test_oracle_is_each_axis_own_expert_and_best_expert_one_of_them(matrix):
    rows = matrix["matrix"]
    assert list(rows)[: len(METHODS)] == METHODS and all(f"expert-{a}" in rows for a in AXES)
    for axis in AXES:
        assert rows["oracle"][axis] == rows[f"expert-{axis}"][axis]
    assert rows["best-expert"]["mean"] == min(rows[f"expert-{a}"]["mean"] for a in AXES)
    assert rows["base"]["mean"] == pytest.approx(sum(rows["base"][a] for a in AXES) / 3)
    # the experts were trained one step: their losses differ from base, so the matrix measured something
    assert any(rows[f"expert-{a}"][a] != rows["base"][a] for a in AXES)
    delta = matrix["paired_to_alignx"]["base"]["mean"]
    assert delta["value"] == pytest.approx(rows["base"]["mean"] - rows["alignx"]["mean"])
    assert delta["ci"][0] <= delta["value"] <= delta["ci"][1]


def test_a_finished_matrix_is_not_computed_again(tiny_stage2_run, matrix, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("every item was cached")

    monkeypatch.setattr(axis_loss.AlignX, "from_run", refuse)
    again = axis_loss_matrix(RunDir(tiny_stage2_run.run_dir), tiny_stage2_run, METHODS, 4, batch_size=3,
                             max_length=1024, resamples=50)
    assert again["matrix"] == matrix["matrix"]
