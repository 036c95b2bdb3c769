"""Stage 1 training throughput: AlignX's expert training vs the authors' recipe, same rows, one run.

Both train a LoRA expert of the helpful axis on the same formatted rows (chat template + injection) of
the embedded default model, with the same batch size and optimiser:

* ours     — ``alignx.stage1.train.ExpertTrainer`` with the default config: length-grouped batches with
             dynamic padding, loss on response tokens only (LM head run only where labels are),
             LoRA r=16 on every attention and MLP projection, bf16 autocast where the CPU supports it;
* authors  — the released code's recipe (``Finetune_Pipeline.py``): every row padded to 512 tokens,
             labels = input_ids (padding included), LoRA r=64 / alpha 32 / dropout 0.1 on q/v, and fp32
             (its TrainingArguments set neither fp16 nor bf16). ``--authors-precision bf16`` runs it under
             the same bf16 autocast as ours instead, to separate the recipe from the precision.

Throughput counts real (non-pad) tokens per second of training-step time. The last line is
``ratio=<ours/authors>``.

    python benchmarks/stage1_throughput.py --quick
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch


def _rows(config, count: int):
    from alignx.data.splits import training_examples

    return training_examples("helpful", config.data).examples[:count]


def ours(config, rows, batch_size: int) -> tuple[int, float, int]:
    from alignx.data.formatting import ChatFormatter
    from alignx.models.loading import load_base_model
    from alignx.run import RunDir
    from alignx.stage1.train import ExpertTrainer, encode_examples

    loaded = load_base_model(config.model, for_training=True)
    encoded, _ = encode_examples(ChatFormatter(loaded.tokenizer), rows, config.injections["helpful"], 512)
    trainer = ExpertTrainer(config, RunDir(config.run_dir), "helpful", loaded.model, loaded.tokenizer, encoded)
    summary = trainer.train()
    return summary.real_tokens, summary.train_seconds, summary.steps


def authors(config, rows, batch_size: int, precision: str) -> tuple[int, float, int]:
    from peft import LoraConfig, get_peft_model
    from transformers import set_seed

    from alignx.data.formatting import ChatFormatter
    from alignx.models.loading import load_base_model
    from alignx.models.precision import autocast

    loaded = load_base_model(config.model, for_training=True)
    formatter, tokenizer = ChatFormatter(loaded.tokenizer), loaded.tokenizer
    texts = [formatter.prompt_text(r.user_text, config.injections["helpful"]) + formatter.completion_text(r.response) for r in rows]
    set_seed(0)
    model = get_peft_model(
        loaded.model, LoraConfig(r=64, lora_alpha=32, lora_dropout=0.1, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.train.lr, weight_decay=0.01)
    model.train()
    real, seconds, steps = 0, 0.0, 0
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(
            texts[start : start + batch_size], padding="max_length", truncation=True, max_length=512,
            add_special_tokens=False, return_tensors="pt",
        )
        began = time.perf_counter()
        with autocast(torch.bfloat16 if precision == "bf16" else None, "cpu"):
            loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds += time.perf_counter() - began
        real += int(batch["attention_mask"].sum())
        steps += 1
        print(f"  authors step {steps}: loss {loss.item():.3f}, {time.perf_counter() - began:.1f} s", flush=True)
    return real, seconds, steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="48 rows (6 steps of 8): under 5 minutes on 2 cores")
    parser.add_argument("--rows", type=int, default=256, help="rows of the helpful split to train on")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--authors-precision", choices=("fp32", "bf16"), default="fp32",
                        help="fp32 as the released code runs; bf16 for a same-precision control")
    args = parser.parse_args()
    rows_wanted = 48 if args.quick else args.rows

    from alignx.config import load_config
    from alignx.models.precision import autocast_dtype

    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(
            None,
            [f"run_dir={Path(tmp) / 'run'}", f"model.name={args.model}", f"train.batch_size={args.batch_size}",
             "train.epochs=1", "train.max_length=512", "train.save_every=100000"],
        )
        rows = _rows(config, rows_wanted)
        dtype = autocast_dtype(config.model, "cpu")
        print(
            f"rows={len(rows)} batch={args.batch_size} ours_precision={dtype or torch.float32} "
            f"authors_precision={args.authors_precision} threads={torch.get_num_threads()}"
        )
        ours_tokens, ours_seconds, ours_steps = ours(config, rows, args.batch_size)
        authors_tokens, authors_seconds, authors_steps = authors(config, rows, args.batch_size, args.authors_precision)
    ours_rate = ours_tokens / ours_seconds
    authors_rate = authors_tokens / authors_seconds
    assert ours_tokens == authors_tokens or math.isclose(ours_tokens, authors_tokens, rel_tol=0.02), (ours_tokens, authors_tokens)
    print(f"ours:    steps={ours_steps} real_tokens={ours_tokens} seconds={ours_seconds:.1f} tokens_per_s={ours_rate:.1f}")
    print(f"authors: steps={authors_steps} real_tokens={authors_tokens} seconds={authors_seconds:.1f} tokens_per_s={authors_rate:.1f}")
    print(f"ratio={ours_rate / authors_rate:.2f}")


if __name__ == "__main__":
    main()
