"""Deterministic batch plans and collation for Stage 1.

A batch plan is a list of batches; a batch is a list of rows; a row is a list of example indices
(one index, or several when packing). The plan for an epoch depends only on (seed, epoch), so a
resumed run replays exactly the batches an uninterrupted run would have seen.

The language-model head only runs on the positions from the earliest response token on
(``logits_to_keep``) instead of the whole prompt: on SmolLM2 it is a 576×49k matmul per token, a fifth
of the model's compute.
"""

from __future__ import annotations

import torch

from alignx.data.formatting import IGNORE_INDEX, EncodedExample


def plan_epoch(
    lengths: list[int], batch_size: int, *, seed: int, epoch: int, group_by_length: bool, pack_to: int | None,
    group_size: int = 50,
) -> list[list[list[int]]]:
    """The batches of one epoch, reproducible from (seed, epoch).

    With ``group_by_length``, the shuffled rows are cut into groups of ``group_size`` batches, each group is
    sorted by length and cut into batches (so a batch holds rows of similar length and little padding),
    and the batch order is shuffled again so training sees no length curriculum.
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    if pack_to is not None:
        rows = pack_rows(order, lengths, pack_to)
        return [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    if not group_by_length:
        return [[[i] for i in order[s : s + batch_size]] for s in range(0, len(order), batch_size)]
    span = group_size * batch_size
    batches = []
    for start in range(0, len(order), span):
        group = sorted(order[start : start + span], key=lambda i: lengths[i], reverse=True)
        batches += [[[i] for i in group[s : s + batch_size]] for s in range(0, len(group), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


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
    """Right-pad the rows of one batch into tensors; no attention mask is needed.

    Padding sits after every real token, so plain causal attention never lets a real token see a pad and
    attention runs its fast causal path. Packed rows also get position ids that restart at each example:
    transformers derives a block-diagonal causal mask from them, so examples sharing a row never attend
    to each other.
    """
    packed = any(len(row) > 1 for row in batch)
    rows = [[i for index in row for i in examples[index].input_ids] for row in batch]
    width = max(len(ids) for ids in rows)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.arange(width).repeat(len(batch), 1)
    for r, row in enumerate(batch):
        offset = 0
        for index in row:
            length = len(examples[index].input_ids)
            input_ids[r, offset : offset + length] = torch.tensor(examples[index].input_ids)
            labels[r, offset : offset + length] = torch.tensor(examples[index].labels)
            position_ids[r, offset:] -= offset  # restart here; padding continues the last example
            offset += length
    first_label = int((labels != IGNORE_INDEX).float().argmax(dim=1).min())
    out: dict[str, torch.Tensor | int] = {
        "input_ids": input_ids,
        "labels": labels,
        # positions from the one before the earliest label to the end: all the head needs to score
        "logits_to_keep": width - max(first_label - 1, 0),
        "real_tokens": sum(len(ids) for ids in rows),
    }
    if packed:
        out["position_ids"] = position_ids
    return out
