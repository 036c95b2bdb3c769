"""Preference training (train.objective.<axis>: dpo): the pairs, and DPO through TRL moving the expert's margin."""

import json

import pytest
import torch

from alignx.config import load_config
from alignx.data.formatting import ChatFormatter
from alignx.data.splits import Example, PreferencePair, preference_pairs, training_examples
from alignx.errors import AlignXError
from alignx.models.loading import load_base_model
from alignx.run import RunDir
from alignx.stage1.pipeline import run_stage1
from alignx.stage1.preference import pair_rows, train_preference_expert

PAIRS = [  # a memorisation set: the same kind of preference on every prompt, so a tiny model can learn it
    (f"Question number {i}: is the moon made of cheese?", "No, it is made of rock.", "Yes, it is made of cheese.")
    for i in range(40)
]


def _config(tmp_path, model_dir, *extra):
    return load_config(None, [f"run_dir={tmp_path / 'run'}", f"model.name={model_dir}", "model.precision=fp32",
                              "train.batch_size=4", "train.lr=0.01", "train.warmup_ratio=0", "train.max_length=256",
                              "train.objective.honest=dpo", "lora.dropout=0", *extra])


def _pairs():
    return [PreferencePair(Example("honest", q, "", good, "test", f"test:{i}"), bad) for i, (q, good, bad) in enumerate(PAIRS)]


def _margin(model, formatter, pairs, injection) -> float:
    """Mean log p(chosen) − log p(rejected) of the pairs under ``model`` (completion tokens only)."""
    total = 0.0
    for row in pair_rows(formatter, pairs, injection):
        prompt = formatter.tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        logp = []
        for answer in (row["chosen"], row["rejected"]):
            ids = torch.tensor([prompt + formatter.tokenizer(answer, add_special_tokens=False)["input_ids"]])
            with torch.no_grad():
                logits = model(ids).logits[0, len(prompt) - 1 : -1].log_softmax(-1)
            logp.append(float(logits.gather(1, ids[0, len(prompt):, None]).sum()))
        total += logp[0] - logp[1]
    return total / len(pairs)


def test_dpo_raises_the_chosen_answers_margin_over_the_base_and_saves_an_ordinary_expert(tmp_path, tiny_model_dir):
    config = _config(tmp_path, tiny_model_dir, "train.max_steps=12", "train.save_every=5")
    loaded = load_base_model(config.model, for_training=True)
    formatter = ChatFormatter(loaded.tokenizer)
    injection = config.injections["honest"]
    before = _margin(loaded.model, formatter, _pairs(), injection)
    run = RunDir(config.run_dir)
    summary = train_preference_expert(config, run, "honest", loaded, _pairs(), log=lambda *_: None)
    assert summary.objective == "dpo" and summary.steps == 12 and summary.held_out_pairs > 0
    assert summary.held_out_reward_accuracy > 0.5  # the held-out prompts: it prefers the chosen more than base does
    assert run.has_trained_expert("honest") and not run.checkpoints_dir("honest").exists()
    assert json.loads(run.summary_path("honest").read_text())["objective"] == "dpo"
    from peft import PeftModel

    expert = PeftModel.from_pretrained(load_base_model(config.model).model, run.adapter_dir("honest"))
    assert _margin(expert, formatter, _pairs(), injection) > before + 1.0
    with expert.disable_adapter():  # the reference: the base itself, untouched by training
        assert _margin(expert, formatter, _pairs(), injection) == pytest.approx(before, abs=1e-4)


def test_an_unfinished_dpo_run_needs_resume(tmp_path, tiny_model_dir):
    config = _config(tmp_path, tiny_model_dir, "train.max_steps=4")
    run = RunDir(config.run_dir)
    (run.checkpoints_dir("honest") / "checkpoint-2").mkdir(parents=True)
    with pytest.raises(AlignXError, match="pass --resume"):
        train_preference_expert(config, run, "honest", load_base_model(config.model, for_training=True), _pairs())


def test_the_preference_pairs_come_from_the_axes_own_training_sources(data_dir):
    config = load_config(None, [f"data.data_dir={data_dir}"])
    honest = preference_pairs("honest", config.data)
    trained = {e.user_text for e in training_examples("honest", config.data).examples}
    assert honest and {p.chosen.user_text for p in honest} <= trained  # questions 1-408 only, decontaminated
    assert all(p.chosen.response != p.rejected for p in honest)
    harmless = preference_pairs("harmless", config.data)
    assert harmless and all(p.chosen.source == "hh_rlhf_harmless" and p.chosen.response != p.rejected for p in harmless)
    with pytest.raises(AlignXError, match="helpful axis has no preference pairs"):
        preference_pairs("helpful", config.data)


def test_stage1_trains_a_dpo_axis_by_preference_and_the_others_by_sft(tmp_path, tiny_model_dir, data_dir):
    config = load_config(None, [
        f"run_dir={tmp_path / 'run'}", f"model.name={tiny_model_dir}", "model.precision=fp32", f"data.data_dir={data_dir}",
        "data.max_rows_per_axis=48", "train.max_steps=1", "train.batch_size=4", "train.max_length=256",
        "features.max_length=64", "train.objective.honest=dpo"])
    run = run_stage1(config, log=lambda *_: None)
    experts = run.read_manifest()["experts"]
    assert experts["honest"]["objective"] == "dpo" and experts["harmless"]["objective"] == "sft"
    assert all(run.has_trained_expert(axis) for axis in ("helpful", "harmless", "honest"))


def test_prompts_longer_than_the_budget_are_explained(tmp_path, tiny_model_dir):
    config = _config(tmp_path, tiny_model_dir, "train.max_length=8")
    with pytest.raises(AlignXError, match="raise train.max_length"):
        train_preference_expert(config, RunDir(config.run_dir), "honest", load_base_model(config.model, for_training=True), _pairs())


def test_dpo_settings_are_checked():
    with pytest.raises(AlignXError, match="train.objective.helpful cannot be dpo"):
        load_config(None, ["train.objective.helpful=dpo"])
    with pytest.raises(AlignXError, match="train.objective.honest must be one of"):
        load_config(None, ["train.objective.honest=orpo"])
