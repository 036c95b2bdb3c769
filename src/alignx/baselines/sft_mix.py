"""``sft-mix``: one LoRA trained on all three axes' data at once, with the experts' total budget."""

from __future__ import annotations

from pathlib import Path

from alignx.baselines.budget import encoded_rows, expert_steps, with_steps
from alignx.config import AlignXConfig
from alignx.data.formatting import ChatFormatter
from alignx.models.loading import load_base_model
from alignx.run import RunDir
from alignx.stage1.train import ExpertTrainer


def train_sft_mix(run: RunDir, config: AlignXConfig, *, resume: bool = False, log=print) -> Path:
    """Write ``experts/sft-mix/adapter``: every axis's rows (each with its own injection prompt), shuffled
    together, for as many optimizer steps as the three experts took together (same budget)."""
    if run.has_adapter("sft-mix"):
        log(f"[baseline] sft-mix already trained in {run.adapter_dir('sft-mix')}; skipping")
        return run.adapter_dir("sft-mix")
    steps = expert_steps(run, "sft-mix")
    loaded = load_base_model(config.model, for_training=True)
    encoded = encoded_rows(ChatFormatter(loaded.tokenizer), config)
    log(f"[baseline] sft-mix: {len(encoded)} rows of all axes, {steps} steps (the experts' total)")
    summary = ExpertTrainer(with_steps(config, steps), run, "sft-mix", loaded.model, loaded.tokenizer, encoded).train(resume=resume)
    log(f"[baseline] sft-mix: final loss {summary.final_loss:.4f} -> {run.adapter_dir('sft-mix')}")
    return run.adapter_dir("sft-mix")
