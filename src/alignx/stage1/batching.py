"""Deterministic batch plans and collation for Stage 1.

A batch plan is a list of batches; a batch is a list of rows; a row is a list of example indices
(one index, or several when packing). The plan for an epoch depends only on (seed, epoch), so a
resumed run replays exactly the batches an uninterrupted run would have seen.

Rows are *left*-padded with explicit position ids: the response tokens then sit at the end of every
row, and the language-model head only has to run on the last ``logits_to_keep`` positions instead of
the whole prompt (the head is a 576×49k matmul per token on SmolLM2: a fifth of the model's compute).
"""

from __future__ import annotations

import torch

from alignx.data.formatting import IGNORE_INDEX, EncodedExample


def plan_epoch(
    lengths: list[int], batch_size: int, *, seed: int, epoch: int, group_by_length: bool, pack_to: int | None
) -> list[list[list[int]]]:
    """The batches of one epoch, reproducible from (seed, epoch)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    if group_by_length and pack_to is None:
        from transformers.trainer_pt_utils import LengthGroupedSampler

        order = list(LengthGroupedSampler(batch_size, lengths=lengths, generator=generator))
    else:
        order = torch.randperm(len(lengths), generator=generator).tolist()
    rows = pack_rows(order, lengths, pack_to) if pack_to is not None else [[i] for i in order]
    return [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]


def pack_rows(order: list[int], lengths: list[int], capacity: int) -> list[list[int]]:
    """Greedily fill rows of ``capacity`` tokens with examples in the given order."""
    rows: list[list[int]] = []
    current: list[int] = []
    used = 0
    for index in order:
        if current and used + lengths[index] > capacity:
            rows.append(current)
            current, used = [], 0
        current.append(index)
        used += lengths[index]
    if current:
        rows.append(current)
    return rows


def collate(batch: list[list[int]], examples: list[EncodedExample], pad_id: int) -> dict[str, torch.Tensor | int]:
    """Left-pad the rows of one batch into tensors, with per-example position ids.

    Packed rows get no attention mask: transformers then derives a block-diagonal causal mask from the
    restarting position ids, so examples sharing a row never attend to each other.
    """
    packed = any(len(row) > 1 for row in batch)
    row_ids, row_labels, row_positions = [], [], []
    for row in batch:
        ids, labels, positions = [], [], []
        for index in row:
            ids += examples[index].input_ids
            labels += examples[index].labels
            positions += range(len(examples[index].input_ids))
        row_ids.append(ids)
        row_labels.append(labels)
        row_positions.append(positions)
    width = max(len(ids) for ids in row_ids)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(batch), width), dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for r, (ids, labs, pos) in enumerate(zip(row_ids, row_labels, row_positions)):
        start = width - len(ids)
        input_ids[r, start:] = torch.tensor(ids)
        labels[r, start:] = torch.tensor(labs)
        position_ids[r, start:] = torch.tensor(pos)
        attention_mask[r, start:] = 1
    first_label = int((labels != IGNORE_INDEX).float().argmax(dim=1).min())
    out: dict[str, torch.Tensor | int] = {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        # positions from the one before the earliest label to the end: all the head needs to score
        "logits_to_keep": width - max(first_label - 1, 0),
        "real_tokens": int(attention_mask.sum()),
    }
    if not packed:
        out["attention_mask"] = attention_mask
    return out
