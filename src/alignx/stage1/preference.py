"""Preference training of an expert (``train.objective.<axis>: dpo``): DPO through TRL's ``DPOTrainer`` with LoRA.

The expert is the same LoRA adapter as an SFT expert (``lora.*``, the axis's injected instruction as the system
turn) and lands in the same place (``experts/<axis>/adapter``), so Stage 2, mixing and serving cannot tell the two
apart. The reference model is the frozen base itself: TRL computes the reference log-probabilities with the
adapter disabled, so no second copy of the model is held. Pairs come from the axis's own training sources
(:func:`alignx.data.splits.preference_pairs`); a hash-split tenth of the prompts is held out (never trained on) and
the trained expert's reward accuracy there (how often it prefers the chosen answer more than the base does) is
written to the summary: preference training at 135M can fail to learn (FINDINGS: community ORPO runs on
SmolLM-135M ended at 0.40-0.47), and the summary says whether it did.

Budget, schedule and checkpoints follow ``train.*`` (``max_steps`` or ``epochs``, ``batch_size`` pairs per device,
``grad_accum``, ``lr`` with a cosine schedule and ``warmup_ratio``, ``save_every``), and an interrupted run resumes
from TRL's last checkpoint with ``--resume``. Under ``accelerate launch`` TRL's trainer spreads the batches as
Stage 1's own loop does.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import asdict

import torch
from datasets import Dataset
from transformers.trainer_utils import get_last_checkpoint
from trl import DPOConfig, DPOTrainer

from alignx.config import AlignXConfig
from alignx.data.formatting import ChatFormatter
from alignx.data.splits import PreferencePair, in_hash_fraction
from alignx.errors import AlignXError
from alignx.models.precision import autocast_dtype
from alignx.run import RunDir, atomic_dir, atomic_write_json
from alignx.stage1.train import TrainingSummary, lora_config_for

HELD_OUT = 0.1  # of the pairs' prompts (by a stable hash), for the held-out reward accuracy


def pair_rows(formatter: ChatFormatter, pairs: list[PreferencePair], injection: str) -> list[dict[str, str]]:
    """TRL's standard (text) preference rows: the prompt as the expert sees it in training (its injection as the
    system turn) and each answer as the template completes it (end-of-turn included, trailing whitespace cut so
    TRL does not add a second end-of-sequence token after it)."""
    return [{"prompt": formatter.prompt_text(p.chosen.user_text, injection),
             "chosen": formatter.completion_text(p.chosen.response).rstrip(),
             "rejected": formatter.completion_text(p.rejected).rstrip()} for p in pairs]


def train_preference_expert(config: AlignXConfig, run: RunDir, axis: str, loaded, pairs: list[PreferencePair], *,
                            resume: bool = False, log=print) -> TrainingSummary:
    """Train ``axis``'s expert by DPO on ``pairs`` and save it as ``experts/<axis>/adapter`` (summary first)."""
    cfg = config.train
    formatter = ChatFormatter(loaded.tokenizer)
    held_out = [in_hash_fraction(p.chosen.user_text, HELD_OUT) for p in pairs]
    train = [p for p, h in zip(pairs, held_out) if not h]
    test = [p for p, h in zip(pairs, held_out) if h]
    if not train or not test:
        raise AlignXError(f"axis {axis}: {len(pairs)} preference pairs are too few to hold a tenth of their prompts out")
    rows = pair_rows(formatter, train, config.injections[axis])
    if all(len(loaded.tokenizer(r["prompt"], add_special_tokens=False)["input_ids"]) >= cfg.max_length for r in rows):
        raise AlignXError(f"axis {axis}: every preference prompt is longer than train.max_length={cfg.max_length} once "
                          "formatted with its injection; raise train.max_length")
    checkpoints = run.checkpoints_dir(axis)
    last = get_last_checkpoint(str(checkpoints)) if checkpoints.is_dir() else None
    if last is not None and not resume:
        raise AlignXError(f"{run.root} holds an unfinished training of axis {axis} ({last}); pass --resume to continue "
                          "it, or use a new --run directory")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    steps_per_epoch = max(1, len(train) // (cfg.batch_size * cfg.grad_accum))
    args = DPOConfig(
        output_dir=str(checkpoints), max_steps=cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch)),
        per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.lr, lr_scheduler_type="cosine",
        warmup_steps=cfg.warmup_ratio, weight_decay=cfg.weight_decay,  # a float below 1: a fraction of the steps max_grad_norm=cfg.max_grad_norm,
        beta=cfg.dpo_beta, max_length=cfg.max_length, seed=cfg.seed, data_seed=cfg.seed,
        save_steps=cfg.save_every, save_total_limit=cfg.keep_checkpoints, logging_steps=1, report_to=[],
        bf16=autocast_dtype(config.model, device) == torch.bfloat16, use_cpu=device.type == "cpu",
        dataloader_num_workers=0, disable_tqdm=False,
        gradient_checkpointing=False,  # TRL's default recomputes every activation; Stage 1's SFT loop does not either
    )
    trainer = DPOTrainer(
        model=loaded.model, args=args, processing_class=loaded.tokenizer, peft_config=lora_config_for(loaded.model, config),
        train_dataset=Dataset.from_list(rows),
        eval_dataset=Dataset.from_list(pair_rows(formatter, test, config.injections[axis])),
    )
    log(f"[stage1] {axis}: DPO on {len(train)} pairs ({len(test)} held out), beta {cfg.dpo_beta}, "
        f"reference = the base with the adapter disabled")
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=last)
    seconds = time.perf_counter() - started
    held = trainer.evaluate()
    history = [row for row in trainer.state.log_history if "loss" in row]
    tokens = int(history[-1].get("num_tokens", 0)) if history else 0  # TRL counts the tokens it trained on
    summary = TrainingSummary(
        axis=axis, steps=trainer.state.global_step, examples=len(train), real_tokens=tokens,
        label_tokens=0, train_seconds=round(seconds, 3), tokens_per_second=round(tokens / max(seconds, 1e-9), 2),
        final_loss=float(history[-1]["loss"]) if history else float("nan"), objective="dpo",
        held_out_reward_accuracy=float(held["eval_rewards/accuracies"]), held_out_pairs=len(test),
    )
    log(f"[stage1] {axis}: held-out reward accuracy {summary.held_out_reward_accuracy:.3f} on {len(test)} pairs "
        f"(0.5 = no better than the base)")
    if trainer.accelerator.is_main_process:
        atomic_write_json(run.train_log_path(axis).with_name("dpo_log.json"), trainer.state.log_history)
        atomic_write_json(run.summary_path(axis), asdict(summary))  # the summary first, then the adapter
        with atomic_dir(run.adapter_dir(axis)) as tmp:
            trainer.model.save_pretrained(tmp, safe_serialization=True)
        shutil.rmtree(checkpoints, ignore_errors=True)
    return summary
