"""The axis-loss matrix on a tiny run: teacher-forced NLL per method and axis, the oracle, resuming."""

import hashlib

import pytest
import torch

from alignx.axes import AXES
from alignx.eval import axis_loss
from alignx.eval.axis_loss import axis_loss_matrix, cross_fitted_best, gold_items
from alignx.run import RunDir

METHODS = ["alignx", "oracle", "best-expert", "base", "expert-honest"]


@pytest.fixture(scope="module")
def matrix(tiny_stage2_run):
    return axis_loss_matrix(RunDir(tiny_stage2_run.run_dir), tiny_stage2_run, METHODS, 4, batch_size=3,
                            max_length=1024, resamples=50)


def test_base_loss_is_the_plain_models_nll_over_content_tokens_with_the_end_of_turn_apart(tiny_stage2_run, matrix):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignx.data.formatting import ChatFormatter

    tokenizer = AutoTokenizer.from_pretrained(tiny_stage2_run.model.name)
    model = AutoModelForCausalLM.from_pretrained(tiny_stage2_run.model.name).eval()
    formatter = ChatFormatter(tokenizer)
    content, tokens, end, answers = 0.0, 0, 0.0, 0
    for example in gold_items(tiny_stage2_run, 4)["honest"]:  # one at a time, no padding, no experts
        prompt = tokenizer(formatter.prompt_text(example.user_text), add_special_tokens=False)["input_ids"]
        answer = tokenizer(formatter.completion_text(example.response), add_special_tokens=False)["input_ids"]
        own = len(tokenizer(example.response.strip(), add_special_tokens=False)["input_ids"])  # then <|im_end|>\n
        ids = torch.tensor([(prompt + answer)[:1024]])
        with torch.no_grad():
            logits = model(ids).logits[0, len(prompt) - 1 : -1]
        nll = torch.nn.functional.cross_entropy(logits, ids[0, len(prompt):], reduction="none")
        content, tokens = content + float(nll[:own].sum()), tokens + own
        end, answers = end + float(nll[own:].sum()), answers + 1
    assert matrix["matrix"]["base"]["honest"] == pytest.approx(content / tokens, rel=1e-4)
    assert matrix["per_answer"]["base"]["honest"] == pytest.approx(content / answers, rel=1e-4)
    assert matrix["end_of_turn"]["base"]["honest"] == pytest.approx(end / answers, rel=1e-4)


def test_the_matrix_measures_the_experts_and_pairs_every_method_with_alignx(matrix):
    rows = matrix["matrix"]
    assert list(rows)[: len(METHODS)] == METHODS and all(f"expert-{a}" in rows for a in AXES)
    assert rows["base"]["mean"] == pytest.approx(sum(rows["base"][a] for a in AXES) / 3)
    # the experts were trained one step: their losses differ from base, so the matrix measured something
    assert any(rows[f"expert-{a}"][a] != rows["base"][a] for a in AXES)
    delta = matrix["paired_to_alignx"]["base"]["mean"]
    assert delta["value"] == pytest.approx(rows["base"]["mean"] - rows["alignx"]["mean"])
    assert delta["ci"][0] <= delta["value"] <= delta["ci"][1]


def test_the_best_expert_is_chosen_on_the_other_fold_not_on_the_items_it_is_scored_on():
    # two experts, each the better one on one fold only: choosing on the same items would take each fold's
    # winner (a minimum of noisy means); cross-fitting gives every fold the other fold's winner instead
    def fold_of(i):
        return int(hashlib.sha256(f"q{i}".encode()).hexdigest()[:8], 16) % 2

    rows = {e: [{"id": f"q{i}", "axis": axis, "tokens": 1.0,
                 "nll": 1.0 if (fold_of(i) == 0) == (e == "expert-helpful") else 2.0}
                for i in range(40) for axis in AXES[:1]] for e in ("expert-helpful", "expert-honest")}
    chosen_rows, chosen = cross_fitted_best(rows)
    assert chosen == {"0": "expert-honest", "1": "expert-helpful"}
    assert all(r["nll"] == 2.0 for r in chosen_rows) and len(chosen_rows) == 40


def test_a_changed_expert_is_scored_anew(tiny_stage2_run, matrix, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    copy = tmp_path / "run"
    shutil.copytree(tiny_stage2_run.run_dir, copy)
    run = RunDir(copy)
    adapter = next(run.adapter_dir("honest").glob("*.safetensors"))
    save_file({name: t + 0.05 for name, t in load_file(adapter).items()}, adapter)  # "retrained" in place
    again = axis_loss_matrix(run, tiny_stage2_run, ["expert-honest", "base"], 4, batch_size=3, max_length=1024, resamples=10)
    assert again["matrix"]["base"] == matrix["matrix"]["base"]  # reused: nothing it depends on changed
    assert again["matrix"]["expert-honest"]["honest"] != matrix["matrix"]["expert-honest"]["honest"]


def test_a_finished_matrix_is_not_computed_again(tiny_stage2_run, matrix, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("every item was cached")

    monkeypatch.setattr(axis_loss.AlignX, "from_run", refuse)
    again = axis_loss_matrix(RunDir(tiny_stage2_run.run_dir), tiny_stage2_run, METHODS, 4, batch_size=3,
                             max_length=1024, resamples=50)
    assert again["matrix"] == matrix["matrix"]
