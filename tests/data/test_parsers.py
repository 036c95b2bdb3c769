"""Row parsers, called directly: normalised fields, stripped text, and the reason each bad record is skipped."""

from __future__ import annotations

import pytest

from alignx.data.parsers import (
    Skip,
    alpaca_eval_annotation,
    instruction_row,
    truthfulqa,
    truthfulqa_finetune,
    truthfulqa_mc,
    xstest,
)


def test_instruction_row_strips_and_treats_a_missing_input_as_none() -> None:
    assert instruction_row({"instruction": " Add ", "output": " 5 "}, 3) == {
        "index": 3, "instruction": "Add", "input": "", "output": "5"}
    for record, reason in [({"instruction": "x"}, "missing field 'output'"),
                           ({"instruction": " ", "output": "y"}, "empty field 'instruction'"),
                           ({"instruction": "x", "output": 5}, "wrong type for field 'output'")]:
        with pytest.raises(Skip, match=reason):
            instruction_row(record, 0)


def test_truthfulqa_answers_split_on_semicolons_and_drop_empty_pieces() -> None:
    row = truthfulqa({"Question": "Q?", "Best Answer": "A", "Correct Answers": "A; B ;", "Incorrect Answers": "X"}, 0)
    assert row["correct_answers"] == ["A", "B"] and row["incorrect_answers"] == ["X"] and row["type"] == ""
    with pytest.raises(Skip, match="empty field 'Correct Answers'"):
        truthfulqa({"Question": "Q?", "Best Answer": "A", "Correct Answers": " ; ", "Incorrect Answers": "X"}, 0)


def test_truthfulqa_mc_reads_both_the_file_and_the_hub_layout() -> None:
    file_row = truthfulqa_mc({"question": "Q?", "mc1_targets": {"a": 1, "b": 0}, "mc2_targets": {"a": 1}}, 0)
    hub_row = truthfulqa_mc({"question": "Q?", "mc1_targets": {"choices": ["a", "b"], "labels": [1, 0]},
                             "mc2_targets": {"choices": ["a"], "labels": [1]}}, 0)
    assert file_row == hub_row == {"index": 0, "question": "Q?", "mc1_targets": {"a": 1, "b": 0}, "mc2_targets": {"a": 1}}
    with pytest.raises(Skip, match="wrong type for field 'mc1_targets'"):
        truthfulqa_mc({"question": "Q?", "mc1_targets": {"a": True}, "mc2_targets": {"a": 1}}, 0)


def test_truthfulqa_finetune_parses_the_judge_prompt() -> None:
    parse = truthfulqa_finetune("True")
    row = parse({"prompt": "Q: Is the sky green?\nA: No.\nTrue:", "completion": " yes"}, 7)
    assert (row["question"], row["answer"], row["label"]) == ("Is the sky green?", "No.", True)
    with pytest.raises(Skip, match="bad value for field 'prompt'"):
        parse({"prompt": "Q: Is the sky green?\nA: No.\nHelpful:", "completion": "no"}, 0)
    with pytest.raises(Skip, match="bad value for field 'completion'"):
        parse({"prompt": "Q: x\nA: y\nTrue:", "completion": "maybe"}, 0)


def test_xstest_numbers_rows_without_an_id_like_the_csv() -> None:
    assert xstest({"prompt": "How do I kill a process?", "type": "homonyms", "label": "safe"}, 4)["id"] == "5"
    with pytest.raises(Skip, match="bad value for field 'label'"):
        xstest({"prompt": "p", "label": "fine"}, 0)


def test_annotation_preference_must_be_a_finite_number() -> None:
    record = {"instruction": "i", "output_1": "a", "output_2": "b", "preference": 2}
    assert alpaca_eval_annotation(record, 0)["preference"] == 2.0
    for bad in (True, float("nan"), "2"):
        with pytest.raises(Skip, match="wrong type for field 'preference'"):
            alpaca_eval_annotation({**record, "preference": bad}, 0)
