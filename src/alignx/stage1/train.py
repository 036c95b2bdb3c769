"""Stage 1: one LoRA expert per axis, trained independently from the same frozen base.

The loop is written on ``accelerate`` so ``accelerate launch`` runs it unchanged on several devices
(each process takes its share of every optimizer step's micro-batches). It owns its checkpoint format
— safetensors for every tensor, JSON for everything else, no pickle — so a resumed run ends with the
same weights as an uninterrupted one, and a run killed at any instant resumes from its last checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from peft import LoraConfig, get_peft_model
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup, set_seed

from alignx.config import AlignXConfig
from alignx.data.formatting import IGNORE_INDEX, ChatFormatter, EncodedExample
from alignx.errors import AlignXError
from alignx.models.layers import target_modules
from alignx.models.precision import autocast_dtype, store_frozen_linears_in
from alignx.run import (
    RunDir,
    atomic_dir,
    atomic_save_safetensors,
    atomic_write_json,
    atomic_write_text,
    load_safetensors,
    read_json,
)
from alignx.stage1.batching import collate, plan_epoch
from alignx.stage1.fast_dropout import use_fast_dropout

_CHECKPOINT = re.compile(r"^step-(\d{6,})$")


@dataclass
class TrainingSummary:
    axis: str
    steps: int
    examples: int
    real_tokens: int
    label_tokens: int
    train_seconds: float
    tokens_per_second: float
    final_loss: float
    objective: str = "sft"  # dpo: alignx.stage1.preference
    held_out_reward_accuracy: float | None = None  # dpo: on the held-out pairs (0.5 = no better than the base)
    held_out_pairs: int | None = None


def encode_examples(formatter: ChatFormatter, examples, injection: str, max_length: int):
    """Encode an axis's rows with its injection prompt; rows left with no response token are counted."""
    encoded: list[EncodedExample] = []
    skipped: Counter[str] = Counter()
    for example in examples:
        row = formatter.encode_training(injection, example.user_text, example.response, max_length)
        if row is None:
            skipped["prompt longer than train.max_length"] += 1
        else:
            encoded.append(row)
    return encoded, skipped


def lora_config_for(model, config: AlignXConfig):
    return LoraConfig(
        r=config.lora.r,
        lora_alpha=config.lora.alpha,
        lora_dropout=config.lora.dropout,
        target_modules=target_modules(model, config.lora.targets),
        task_type="CAUSAL_LM",
    )


class ExpertTrainer:
    """Trains the LoRA expert of one axis into ``run``; call :meth:`train`.

    The optional hooks let a baseline train something other than a fresh LoRA through the same loop,
    budget, checkpoints and logs (``moe-dense`` trains only its token routers this way):

    * ``prepare(model) -> model``: makes the model trainable; its parameters with ``requires_grad`` are
      what is trained and checkpointed. Default: wrap with a new LoRA (``get_peft_model``).
    * ``aux_loss(batch) -> scalar``: called right after each micro-batch's forward; the step's objective
      adds the mean of these over the step's micro-batches to the token-mean LM loss. Its step value is
      logged as ``aux_loss``; the LM ``loss`` logged (and checked against ``train.max_loss``) excludes it.
    * ``save(model)``: writes the trained artifact from the unwrapped model (main process only).
      Default: ``save_pretrained`` of the adapter into ``experts/<axis>/adapter``.
    """

    def __init__(self, config: AlignXConfig, run: RunDir, axis: str, model, tokenizer, examples: list[EncodedExample],
                 *, prepare: Callable | None = None, aux_loss: Callable | None = None, save: Callable | None = None):
        if not examples:
            raise AlignXError(f"axis {axis}: no training rows left after encoding")
        self.config, self.run, self.axis = config, run, axis
        self.prepare, self.aux_loss, self.save = prepare, aux_loss, save
        self.train_cfg = config.train
        self.examples = examples
        self.lengths = [len(e.input_ids) for e in examples]
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._model = model

    # ---- the plan -------------------------------------------------------------------------------------
    def _epoch_batches(self, epoch: int) -> list[list[list[int]]]:
        cfg = self.train_cfg
        return plan_epoch(
            self.lengths,
            cfg.batch_size,
            seed=cfg.seed,
            epoch=epoch,
            group_by_length=cfg.group_by_length,
            pack_to=cfg.max_length if cfg.packing else None,
        )

    def _steps_per_epoch(self, world: int) -> int:
        per_step = self.train_cfg.grad_accum * world
        batches = len(self._epoch_batches(0))
        if batches < per_step:
            raise AlignXError(
                f"axis {self.axis}: {batches} batches per epoch cannot fill one optimizer step of "
                f"{per_step} micro-batches; lower train.grad_accum or train.batch_size"
            )
        return batches // per_step  # the incomplete last group is dropped so every process steps together

    def _total_steps(self, steps_per_epoch: int) -> int:
        return self.train_cfg.max_steps or max(1, math.ceil(self.train_cfg.epochs * steps_per_epoch))

    def _window(self, batches: list, within: int, world: int) -> list:
        """The micro-batches of one optimizer step, every process's (process ``rank`` takes ``[rank::world]``)."""
        per_step = self.train_cfg.grad_accum * world
        return batches[within * per_step : (within + 1) * per_step]

    def examples_seen(self, world: int = 1) -> set[int]:
        """The indices of the examples a whole training run on ``world`` processes feeds the model (the plan is a
        function of the seed alone): the rows an evaluation of the expert must leave out to be held out."""
        steps_per_epoch = self._steps_per_epoch(world)
        seen: set[int] = set()
        plans: dict[int, list] = {}
        for step in range(self._total_steps(steps_per_epoch)):
            epoch, within = divmod(step, steps_per_epoch)
            if epoch not in plans:
                plans[epoch] = self._epoch_batches(epoch)
            for batch in self._window(plans[epoch], within, world):
                seen.update(index for row in batch for index in row)
        return seen

    # ---- the loop -------------------------------------------------------------------------------------
    def train(self, resume: bool = False) -> TrainingSummary:
        cfg = self.train_cfg
        dtype = autocast_dtype(self.config.model, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        accelerator = Accelerator(mixed_precision="bf16" if dtype == torch.bfloat16 else "no")
        world, rank = accelerator.num_processes, accelerator.process_index
        set_seed(cfg.seed)
        if dtype is not None:
            store_frozen_linears_in(self._model, dtype)
        if self.prepare is None:
            model = get_peft_model(self._model, lora_config_for(self._model, self.config))
        else:
            model = self.prepare(self._model)
        if accelerator.device.type == "cpu":
            use_fast_dropout(model)
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
        steps_per_epoch = self._steps_per_epoch(world)
        total_steps = self._total_steps(steps_per_epoch)
        scheduler = get_cosine_schedule_with_warmup(optimizer, round(cfg.warmup_ratio * total_steps), total_steps)
        model, optimizer = accelerator.prepare(model, optimizer)

        start_step = 0
        checkpoint = self.latest_checkpoint()
        if checkpoint is not None:
            if not resume:
                raise AlignXError(
                    f"{self.run.root} holds an unfinished training of axis {self.axis} ({checkpoint.name}); "
                    "pass --resume to continue it, or use a new --run directory"
                )
            start_step = self._load_checkpoint(checkpoint, accelerator, model, optimizer, scheduler, rank)
        log = _TrainLog(self.run.train_log_path(self.axis), keep_until=start_step, enabled=accelerator.is_main_process)

        model.train()
        totals = Counter(log.totals())
        last_loss = float("nan")
        bar = tqdm(
            total=total_steps, initial=start_step, desc=f"stage1 {self.axis}", unit="step",
            disable=not accelerator.is_main_process, dynamic_ncols=True,
        )
        epoch_cache: dict[int, list] = {}
        for step in range(start_step, total_steps):
            epoch, within = divmod(step, steps_per_epoch)
            if epoch not in epoch_cache:
                epoch_cache = {epoch: self._epoch_batches(epoch)}
            window = self._window(epoch_cache[epoch], within, world)[rank::world]
            batches = [collate(b, self.examples, self.pad_id) for b in window]
            label_tokens = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches)
            started = time.perf_counter()
            loss_sum = torch.zeros((), device=accelerator.device)
            aux_sum = torch.zeros((), device=accelerator.device)
            for i, batch in enumerate(batches):
                sync = i == len(batches) - 1
                with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                    micro = self._loss_sum(model, batch, accelerator.device)
                    objective = micro / max(label_tokens, 1)
                    if self.aux_loss is not None:
                        aux = self.aux_loss(batch) / len(batches)
                        objective = objective + aux
                        aux_sum += aux.detach()
                    accelerator.backward(objective)
                loss_sum += micro.detach()
            loss = accelerator.reduce(loss_sum / max(label_tokens, 1), reduction="mean").item()
            if not math.isfinite(loss) or loss > cfg.max_loss:
                last = self.latest_checkpoint()
                kept = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
                raise AlignXError(
                    f"axis {self.axis}: loss became {loss:.4g} at step {step + 1}; training stopped and {kept}. "
                    "Lower train.lr (or raise train.max_loss) and rerun with --resume"
                )
            if cfg.max_grad_norm > 0:
                accelerator.clip_grad_norm_(trainable, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            elapsed = time.perf_counter() - started
            real_tokens = sum(b["real_tokens"] for b in batches) * world
            totals.update(seconds=elapsed, real_tokens=real_tokens, label_tokens=label_tokens * world)
            last_loss = loss
            extra = {} if self.aux_loss is None else {"aux_loss": round(accelerator.reduce(aux_sum, reduction="mean").item(), 6)}
            log.write(
                step=step + 1, epoch=epoch, loss=round(loss, 6), lr=scheduler.get_last_lr()[0],
                real_tokens=real_tokens, label_tokens=label_tokens * world, step_seconds=round(elapsed, 4),
                tokens_per_second=round(totals["real_tokens"] / max(totals["seconds"], 1e-9), 2), **extra,
            )
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{totals['real_tokens'] / max(totals['seconds'], 1e-9):.0f}")
            if (step + 1) % cfg.save_every == 0 and step + 1 < total_steps:
                self._save_checkpoint(step + 1, accelerator, model, optimizer, scheduler)
        bar.close()

        summary = TrainingSummary(
            axis=self.axis, steps=total_steps, examples=len(self.examples),
            real_tokens=int(totals["real_tokens"]), label_tokens=int(totals["label_tokens"]),
            train_seconds=round(totals["seconds"], 3),
            tokens_per_second=round(totals["real_tokens"] / max(totals["seconds"], 1e-9), 2),
            final_loss=last_loss,
        )
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            # the summary first: the trained artifact appears last, so whoever finds it finds its summary too
            atomic_write_json(self.run.summary_path(self.axis), asdict(summary))
            if self.save is not None:
                self.save(accelerator.unwrap_model(model))
            else:
                with atomic_dir(self.run.adapter_dir(self.axis)) as tmp:
                    accelerator.unwrap_model(model).save_pretrained(tmp, safe_serialization=True)
            shutil.rmtree(self.run.checkpoints_dir(self.axis), ignore_errors=True)
        accelerator.wait_for_everyone()
        return summary

    @staticmethod
    def _loss_sum(model, batch: dict, device) -> torch.Tensor:
        """Summed token cross-entropy over the response tokens, scoring only the positions that need it."""
        keep = batch["logits_to_keep"]
        inputs = {k: batch[k].to(device) for k in ("input_ids", "position_ids") if k in batch}
        logits = model(**inputs, logits_to_keep=keep, use_cache=False).logits
        labels = batch["labels"][:, -keep + 1 :].to(device) if keep > 1 else batch["labels"][:, :0].to(device)
        return F.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.size(-1)), labels.reshape(-1),
            ignore_index=IGNORE_INDEX, reduction="sum",
        )

    # ---- checkpoints ----------------------------------------------------------------------------------
    def latest_checkpoint(self) -> Path | None:
        """The newest complete checkpoint; half-written ones (hidden temp dirs) are never candidates."""
        root = self.run.checkpoints_dir(self.axis)
        if not root.is_dir():
            return None
        steps = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _CHECKPOINT.match(p.name)))
        return steps[-1][1] if steps else None

    def _save_checkpoint(self, step: int, accelerator, model, optimizer, scheduler) -> None:
        root = self.run.checkpoints_dir(self.axis)
        staging = root / f".step-{step:06d}.staging"
        if accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        accelerator.wait_for_everyone()
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        atomic_save_safetensors(rng, staging / f"rng-{accelerator.process_index}.safetensors")
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            trainable = {n: p for n, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad}
            atomic_save_safetensors(trainable, staging / "adapter.safetensors")
            tensors, layout = _flatten_optimizer_state(optimizer.state_dict())
            atomic_save_safetensors(tensors, staging / "optimizer.safetensors")
            atomic_write_json(staging / "state.json", {"step": step, "optimizer": layout, "scheduler": scheduler.state_dict()})
            staging.rename(root / f"step-{step:06d}")  # atomic: the checkpoint exists whole or not at all
            for old in sorted(p for p in root.iterdir() if _CHECKPOINT.match(p.name))[: -self.train_cfg.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()

    def _load_checkpoint(self, path: Path, accelerator, model, optimizer, scheduler, rank: int) -> int:
        state = read_json(path / "state.json")
        weights, _ = load_safetensors(path / "adapter.safetensors")
        named = dict(accelerator.unwrap_model(model).named_parameters())
        missing = sorted(set(weights) ^ {n for n, p in named.items() if p.requires_grad})
        if missing:
            raise AlignXError(f"checkpoint {path} does not match this LoRA configuration (e.g. {missing[0]})")
        with torch.no_grad():
            for name, value in weights.items():
                named[name].copy_(value)
        tensors, _ = load_safetensors(path / "optimizer.safetensors")
        optimizer.load_state_dict(_unflatten_optimizer_state(tensors, state["optimizer"]))
        scheduler.load_state_dict(state["scheduler"])
        rng_file = path / f"rng-{rank}.safetensors"
        if rng_file.is_file():
            rng, _ = load_safetensors(rng_file)
            torch.set_rng_state(rng["cpu"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["cuda"])
        return int(state["step"])


class _TrainLog:
    """Append-only JSONL loss log; on resume it is cut back to the checkpoint it resumes from."""

    def __init__(self, path: Path, keep_until: int, enabled: bool):
        self.path, self.enabled = path, enabled
        self.rows: list[dict] = []
        if path.is_file():
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line torn by a kill -9
                if row.get("step", 0) <= keep_until:
                    self.rows.append(row)
        if enabled:
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in self.rows))

    def totals(self) -> dict[str, float]:
        return {
            "seconds": sum(r["step_seconds"] for r in self.rows),
            "real_tokens": sum(r["real_tokens"] for r in self.rows),
            "label_tokens": sum(r["label_tokens"] for r in self.rows),
        }

    def write(self, **row) -> None:
        if self.enabled:
            with open(self.path, "a") as handle:
                handle.write(json.dumps(row) + "\n")


def _flatten_optimizer_state(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into tensors (for safetensors) and a JSON layout."""
    tensors, layout = {}, {"param_groups": state["param_groups"], "state": {}}
    for param_id, values in state["state"].items():
        layout["state"][str(param_id)] = {}
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{param_id}.{key}"] = value
                layout["state"][str(param_id)][key] = "tensor"
            else:
                layout["state"][str(param_id)][key] = value
    return tensors, layout


def _unflatten_optimizer_state(tensors: dict[str, torch.Tensor], layout: dict) -> dict:
    state = {}
    for param_id, values in layout["state"].items():
        state[int(param_id)] = {
            key: tensors[f"{param_id}.{key}"] if value == "tensor" else value for key, value in values.items()
        }
    return {"state": state, "param_groups": layout["param_groups"]}
