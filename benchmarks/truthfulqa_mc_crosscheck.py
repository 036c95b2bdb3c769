"""Cross-check: our TruthfulQA MC1/MC2 against lm-evaluation-harness on the same model and questions.

Runs lm-eval's own ``truthfulqa_mc1`` / ``truthfulqa_mc2`` task definitions (included from the installed
lm_eval package, only the data source swapped for a local JSON file of the chosen questions, because the
hub is not reachable) and :mod:`alignx.eval.truthfulqa_mc` on the same questions, with the embedded default
model in fp32, and prints both. lm-eval is *not* a dependency of AlignX; install it for this script only:

    pip install lm-eval==0.4.13
    python benchmarks/truthfulqa_mc_crosscheck.py --questions 40      # the quick suite's questions
    python benchmarks/truthfulqa_mc_crosscheck.py --questions 0       # all 409 evaluation questions

Last line: ``mc1_ours=<x> mc1_lmeval=<y> mc2_ours=<x> mc2_lmeval=<y> max_abs_diff_points=<d>`` (target <= 1).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=40, help="seeded subset of the 409 evaluation questions (0 = all)")
    parser.add_argument("--model", default="smollm2-135m", help="model.name (default: the embedded SmolLM2)")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise SystemExit("lm-eval is not installed: pip install lm-eval==0.4.13 (it is not an AlignX dependency)") from None
    import torch

    from alignx.config import load_config
    from alignx.eval.benchmarks import benchmark_items
    from alignx.eval.truthfulqa_mc import score_question
    from alignx.models.loading import load_base_model, model_directory

    overrides = [f"model.name={args.model}", "model.precision=fp32"]
    overrides += ["eval.suite=full"] if args.questions == 0 else [f"eval.quick_items={args.questions}"]
    config = load_config(None, overrides)
    items = benchmark_items("truthfulqa_mc", config.data, config.eval)

    loaded = load_base_model(config.model)
    with torch.inference_mode():
        ours = [score_question(loaded.model, loaded.tokenizer, item) for item in items]
    mc1_ours = sum(s["mc1"] for s in ours) / len(ours)
    mc2_ours = sum(s["mc2"] for s in ours) / len(ours)
    del loaded

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "mc.jsonl"
        data.write_text("".join(json.dumps({
            "question": item["prompt"],
            "mc1_targets": {"choices": list(item["mc1_targets"]), "labels": list(item["mc1_targets"].values())},
            "mc2_targets": {"choices": list(item["mc2_targets"]), "labels": list(item["mc2_targets"].values())},
        }) + "\n" for item in items))
        tasks_dir = Path(lm_eval.__file__).parent / "tasks" / "truthfulqa"
        for name in ("mc1", "mc2"):
            (Path(tmp) / f"alignx_{name}.yaml").write_text(
                f"include: {tasks_dir / f'truthfulqa_{name}.yaml'}\ntask: alignx_truthfulqa_{name}\ntag: []\n"
                f"dataset_path: json\ndataset_name: null\ndataset_kwargs:\n  data_files:\n    validation: {data}\n"
            )
        results = lm_eval.simple_evaluate(
            model="hf", model_args=f"pretrained={model_directory(config.model)},dtype=float32",
            tasks=["alignx_truthfulqa_mc1", "alignx_truthfulqa_mc2"], task_manager=TaskManager(include_path=tmp),
            batch_size=args.batch_size, device="cpu",
        )["results"]
    mc1_lm = results["alignx_truthfulqa_mc1"]["acc,none"]
    mc2_lm = results["alignx_truthfulqa_mc2"]["acc,none"]
    print(f"questions={len(items)} model={args.model} dtype=fp32")
    print(f"{'':8}{'ours':>8}{'lm-eval':>10}")
    print(f"{'MC1':8}{mc1_ours:8.4f}{mc1_lm:10.4f}")
    print(f"{'MC2':8}{mc2_ours:8.4f}{mc2_lm:10.4f}")
    diff = 100 * max(abs(mc1_ours - mc1_lm), abs(mc2_ours - mc2_lm))
    print(f"mc1_ours={mc1_ours:.4f} mc1_lmeval={mc1_lm:.4f} mc2_ours={mc2_ours:.4f} mc2_lmeval={mc2_lm:.4f} max_abs_diff_points={diff:.2f}")


if __name__ == "__main__":
    main()
