"""``sft-sequential``: the authors' stacked scheme — each axis's LoRA trained on top of the previous ones.

Stage k merges the LoRAs of stages 1..k−1 into a fresh base, then trains a new LoRA on axis k's data with
that axis's own budget (its expert's step count). The result is base + τ₁ + τ₂ + τ₃ with τ_k trained on
the model the earlier stages left: exactly where interference (Axis Collapse, part 1) comes from.
Stored as ``experts/sft-sequential-<axis>/adapter``; generation attaches the three with weight 1 each.
"""

from __future__ import annotations

from peft import PeftModel

from alignx.axes import AXES
from alignx.baselines.budget import encoded_rows, expert_steps, with_steps
from alignx.config import AlignXConfig
from alignx.data.formatting import ChatFormatter
from alignx.models.loading import load_base_model
from alignx.run import RunDir
from alignx.stage1.train import ExpertTrainer

STAGES = tuple(f"sft-sequential-{axis}" for axis in AXES)


def train_sft_sequential(run: RunDir, config: AlignXConfig, *, resume: bool = False, log=print) -> list[str]:
    for axis, stage in zip(AXES, STAGES):
        if run.has_adapter(stage):
            log(f"[baseline] {stage} already trained; skipping")
            continue
        steps = expert_steps(run, stage, (axis,))
        loaded = load_base_model(config.model, for_training=True)
        model = loaded.model
        for previous in STAGES[: STAGES.index(stage)]:  # fold the earlier stages into the base, in order
            model = PeftModel.from_pretrained(model, run.adapter_dir(previous)).merge_and_unload()
        rows = encoded_rows(ChatFormatter(loaded.tokenizer), config, (axis,))
        summary = ExpertTrainer(with_steps(config, steps), run, stage, model, loaded.tokenizer, rows).train(resume=resume)
        log(f"[baseline] {stage}: {steps} steps on top of {STAGES.index(stage)} earlier stage(s), final loss {summary.final_loss:.4f}")
    return list(STAGES)
