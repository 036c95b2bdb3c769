"""Stage 1 — prompt-injected fine-tuning: one LoRA expert per axis, task vectors, task-feature banks."""
