"""Batch plans are reproducible; padding and packing never change what the model learns."""

import pytest
import torch

from alignx.config import ModelConfig
from alignx.data.formatting import IGNORE_INDEX, ChatFormatter
from alignx.stage1.batching import collate, pack_rows, plan_epoch
from alignx.stage1.train import ExpertTrainer

QUESTIONS = [
    ("Name a primary color.", "Red."),
    ("Give three tips for staying healthy, with a sentence on each.", "Eat well. Sleep enough. Exercise every day."),
    ("What is 2+2?", "Four."),
    ("Describe the quick brown fox in detail, please.", "The quick brown fox jumps over the lazy dog."),
]


@pytest.fixture(scope="module")
def encoded(tiny_tokenizer):
    formatter = ChatFormatter(tiny_tokenizer)
    return [formatter.encode_training("Be honest.", q, a, max_length=512) for q, a in QUESTIONS]


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from alignx.models.loading import load_base_model

    model = load_base_model(ModelConfig(name=str(tiny_model_dir), precision="fp32")).model
    return model.eval()


def test_plan_is_a_reproducible_permutation():
    lengths = [5, 50, 7, 30, 12, 9, 41, 3, 22, 17]
    plan = plan_epoch(lengths, 3, seed=0, epoch=1, group_by_length=True, pack_to=None)
    flat = [i for batch in plan for row in batch for i in row]
    assert sorted(flat) == list(range(len(lengths)))
    assert plan == plan_epoch(lengths, 3, seed=0, epoch=1, group_by_length=True, pack_to=None)
    assert plan != plan_epoch(lengths, 3, seed=0, epoch=2, group_by_length=True, pack_to=None)


def test_packing_respects_capacity_and_keeps_every_example():
    lengths = [5, 50, 7, 30, 12, 9, 41, 3, 22, 17]
    rows = pack_rows(list(range(10)), lengths, capacity=60)
    assert sorted(i for row in rows for i in row) == list(range(10))
    assert all(sum(lengths[i] for i in row) <= 60 for row in rows)


def test_collate_pads_right_and_masks_padding(encoded, tiny_tokenizer):
    batch = collate([[0], [1]], encoded, pad_id=tiny_tokenizer.pad_token_id)
    short = len(encoded[0].input_ids)
    width = batch["input_ids"].shape[1]
    assert width > short
    assert (batch["input_ids"][0, short:] == tiny_tokenizer.pad_token_id).all()
    assert (batch["labels"][0, short:] == IGNORE_INDEX).all()  # padding carries no loss
    assert batch["labels"][0, :short].tolist() == encoded[0].labels  # prompt tokens stay IGNORE_INDEX
    assert "attention_mask" not in batch and "position_ids" not in batch  # pads come after: causal suffices
    assert batch["real_tokens"] == short + len(encoded[1].input_ids)


def test_packed_rows_restart_positions(encoded, tiny_tokenizer):
    batch = collate([[0, 1]], encoded, pad_id=tiny_tokenizer.pad_token_id)
    first, second = len(encoded[0].input_ids), len(encoded[1].input_ids)
    assert batch["position_ids"][0].tolist() == list(range(first)) + list(range(second))


def test_padding_does_not_change_the_loss(model, encoded, tiny_tokenizer):
    pad = tiny_tokenizer.pad_token_id
    together = ExpertTrainer._loss_sum(model, collate([[0], [1], [2]], encoded, pad), "cpu")
    alone = sum(ExpertTrainer._loss_sum(model, collate([[i]], encoded, pad), "cpu") for i in range(3))
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-4)


def test_logits_to_keep_scores_every_label(model, encoded, tiny_tokenizer):
    batch = collate([[0], [3]], encoded, pad_id=tiny_tokenizer.pad_token_id)
    full = dict(batch, logits_to_keep=batch["input_ids"].shape[1])
    torch.testing.assert_close(ExpertTrainer._loss_sum(model, batch, "cpu"), ExpertTrainer._loss_sum(model, full, "cpu"))
    assert batch["logits_to_keep"] < batch["input_ids"].shape[1]


def test_packed_rows_give_the_same_loss_as_separate_rows(model, encoded, tiny_tokenizer):
    pad = tiny_tokenizer.pad_token_id
    packed = collate([[0, 1], [2, 3]], encoded, pad)
    assert "attention_mask" not in packed
    separate = collate([[0], [1], [2], [3]], encoded, pad)
    torch.testing.assert_close(
        ExpertTrainer._loss_sum(model, packed, "cpu"), ExpertTrainer._loss_sum(model, separate, "cpu"), rtol=1e-4, atol=1e-4
    )


def test_length_grouping_keeps_padding_small():
    import random

    rng = random.Random(0)
    lengths = [rng.randint(20, 400) for _ in range(48)]
    grouped = plan_epoch(lengths, 8, seed=0, epoch=0, group_by_length=True, pack_to=None)
    shuffled = plan_epoch(lengths, 8, seed=0, epoch=0, group_by_length=False, pack_to=None)

    def padded(plan):
        return sum(max(lengths[r[0]] for r in batch) * len(batch) for batch in plan)

    assert padded(grouped) < 0.75 * padded(shuffled)
    assert padded(grouped) < 1.15 * sum(lengths)
