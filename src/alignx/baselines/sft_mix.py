"""``sft-mix``: one LoRA trained on all three axes' data at once, with the experts' total budget."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from alignx.axes import AXES
from alignx.config import AlignXConfig
from alignx.errors import AlignXError
from alignx.run import RunDir, read_json


def train_sft_mix(run: RunDir, config: AlignXConfig, *, resume: bool = False, log=print) -> Path:
    """Write ``experts/sft-mix/adapter``: every axis's rows (each with its own injection prompt), shuffled
    together, for as many optimizer steps as the three experts took together (same budget)."""
    from alignx.data.formatting import ChatFormatter
    from alignx.data.splits import training_examples
    from alignx.models import load_base_model
    from alignx.stage1.train import ExpertTrainer, encode_examples

    if run.has_adapter("sft-mix"):
        log(f"[baseline] sft-mix already trained in {run.adapter_dir('sft-mix')}; skipping")
        return run.adapter_dir("sft-mix")
    summaries = [run.summary_path(axis) for axis in AXES]
    if not all(path.is_file() for path in summaries):
        raise AlignXError(f"sft-mix matches the budget of the three experts: run `alignx stage1 --run {run.root}` first")
    steps = sum(int(read_json(path)["steps"]) for path in summaries)
    loaded = load_base_model(config.model, for_training=True)
    formatter = ChatFormatter(loaded.tokenizer)
    encoded = []
    for axis in AXES:
        rows, _ = encode_examples(formatter, training_examples(axis, config.data).examples, config.injections[axis], config.train.max_length)
        encoded += rows
    budget = dataclasses.replace(config, train=dataclasses.replace(config.train, max_steps=steps))
    log(f"[baseline] sft-mix: {len(encoded)} rows of all axes, {steps} steps (the experts' total)")
    summary = ExpertTrainer(budget, run, "sft-mix", loaded.model, loaded.tokenizer, encoded).train(resume=resume)
    log(f"[baseline] sft-mix: final loss {summary.final_loss:.4f} -> {run.adapter_dir('sft-mix')}")
    return run.adapter_dir("sft-mix")
