"""The Stage 1 training loop: it learns, it resumes exactly, and it stops on a diverging loss."""

import json

import pytest
import torch
from safetensors.torch import load_file

from alignx.config import load_config
from alignx.data.formatting import ChatFormatter
from alignx.errors import AlignXError
from alignx.models.loading import load_base_model
from alignx.run import RunDir
from alignx.stage1.train import ExpertTrainer

FACTS = [
    ("Who wrote the note?", "The quick brown fox."),
    ("What are the primary colors?", "Red, blue, and yellow."),
    ("What happens if you eat watermelon seeds?", "Nothing happens; they pass through."),
    ("Give one tip for staying healthy.", "Exercise regularly."),
    ("What is the answer?", "I cannot help with that request."),
    ("Say the digits.", "0123456789"),
]


def _config(tmp_path, model_dir, **train):
    overrides = [f"run_dir={tmp_path / 'run'}", f"model.name={model_dir}", "model.precision=fp32", "lora.dropout=0.1"]
    overrides += [f"train.{k}={v}" for k, v in {"batch_size": 2, "lr": 0.01, "warmup_ratio": 0.0, **train}.items()]
    return load_config(None, overrides)


def _trainer(config, axis="helpful"):
    loaded = load_base_model(config.model, for_training=True)
    formatter = ChatFormatter(loaded.tokenizer)
    examples = [formatter.encode_training(config.injections[axis], q, a, 128) for q, a in FACTS]
    return ExpertTrainer(config, RunDir(config.run_dir), axis, loaded.model, loaded.tokenizer, examples)


def _losses(run_dir, axis="helpful"):
    lines = (run_dir / "experts" / axis / "train_log.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


def test_loss_falls_on_a_memorisation_set(tmp_path, tiny_model_dir):
    config = _config(tmp_path, tiny_model_dir, max_steps=60, batch_size=6)
    summary = _trainer(config).train()
    losses = _losses(tmp_path / "run")
    assert len(losses) == 60 and summary.steps == 60
    assert losses[-1] < 0.3 * losses[0], losses[::10]
    assert (tmp_path / "run/experts/helpful/adapter/adapter_model.safetensors").is_file()
    assert not (tmp_path / "run/experts/helpful/checkpoints").exists()  # removed once the adapter is final


def test_resumed_run_ends_with_the_same_weights(tmp_path, tiny_model_dir, monkeypatch):
    straight = _config(tmp_path / "a", tiny_model_dir, max_steps=6, save_every=2)
    _trainer(straight).train()

    interrupted = _config(tmp_path / "b", tiny_model_dir, max_steps=6, save_every=2)
    real_save = ExpertTrainer._save_checkpoint
    saves = []

    def save_then_die(self, step, *args):
        real_save(self, step, *args)
        saves.append(step)
        if step == 4:
            raise KeyboardInterrupt  # stands in for kill -9 right after a checkpoint

    monkeypatch.setattr(ExpertTrainer, "_save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        _trainer(interrupted).train()
    monkeypatch.setattr(ExpertTrainer, "_save_checkpoint", real_save)
    with pytest.raises(AlignXError, match="--resume"):
        _trainer(interrupted).train(resume=False)
    _trainer(interrupted).train(resume=True)

    a = load_file(tmp_path / "a/run/experts/helpful/adapter/adapter_model.safetensors")
    b = load_file(tmp_path / "b/run/experts/helpful/adapter/adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        # both trainings ran here, on one CPU and one code path: a resume must reproduce the uninterrupted run
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    assert _losses(tmp_path / "a/run") == _losses(tmp_path / "b/run")


def test_diverging_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, tiny_model_dir, monkeypatch):
    config = _config(tmp_path, tiny_model_dir, max_steps=6, save_every=2)
    real_loss = ExpertTrainer._loss_sum
    calls = []

    def nan_at_step_four(model, batch, device):
        calls.append(1)
        loss = real_loss(model, batch, device)
        return loss * float("nan") if len(calls) == 4 else loss

    monkeypatch.setattr(ExpertTrainer, "_loss_sum", staticmethod(nan_at_step_four))
    with pytest.raises(AlignXError, match="loss became nan at step 4.*step-000002"):
        _trainer(config).train()
    checkpoints = sorted(p.name for p in (tmp_path / "run/experts/helpful/checkpoints").iterdir())
    assert checkpoints == ["step-000002"]
    assert not (tmp_path / "run/experts/helpful/adapter").exists()


def test_examples_seen_are_exactly_the_rows_training_feeds(tmp_path, tiny_model_dir, monkeypatch):
    import alignx.stage1.train as train_module

    fed = set()
    real_collate = train_module.collate

    def spy(batch, examples, pad_id):
        fed.update(index for row in batch for index in row)
        return real_collate(batch, examples, pad_id)

    monkeypatch.setattr(train_module, "collate", spy)
    trainer = _trainer(_config(tmp_path, tiny_model_dir, max_steps=2, batch_size=2))  # 2 of the 3 batches of an epoch
    trainer.train()
    assert fed == trainer.examples_seen() and len(fed) == 4
