"""What the trained baselines share: the experts' step budget and the rows of every axis.

"Same budget" (METHOD.md section 4) means a baseline gets as many optimizer steps as the experts it
competes with took, read from their ``summary.json``; mixed-data baselines see every axis's rows, each
formatted with its own axis's injection prompt, shuffled together by the Stage 1 batch plan.
"""

from __future__ import annotations

import dataclasses

from alignx.axes import AXES
from alignx.config import AlignXConfig
from alignx.data.splits import training_examples
from alignx.errors import AlignXError
from alignx.run import RunDir, read_json
from alignx.stage1.train import encode_examples


def expert_steps(run: RunDir, method: str, axes: tuple[str, ...] = AXES) -> int:
    """Total optimizer steps of the given axis experts (a clear error when Stage 1 has not finished)."""
    missing = [axis for axis in axes if not run.summary_path(axis).is_file()]
    if missing:
        raise AlignXError(
            f"{method} matches the budget of the {', '.join(axes)} expert(s), but {', '.join(missing)} "
            f"is not trained: run `alignx stage1 --run {run.root}` first"
        )
    return sum(int(read_json(run.summary_path(axis))["steps"]) for axis in axes)


def with_steps(config: AlignXConfig, steps: int) -> AlignXConfig:
    """``config`` with ``train.max_steps`` set to the budget."""
    return dataclasses.replace(config, train=dataclasses.replace(config.train, max_steps=steps))


def encoded_rows(formatter, config: AlignXConfig, axes: tuple[str, ...] = AXES) -> list:
    """The training rows of the given axes, each encoded with its own axis's injection prompt."""
    rows = []
    for axis in axes:
        encoded, _ = encode_examples(formatter, training_examples(axis, config.data).examples,
                                     config.injections[axis], config.train.max_length)
        rows += encoded
    return rows
