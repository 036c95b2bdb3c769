"""Does a DPO-trained expert beat the base model (and its SFT expert) by the judges, on training-fold items?

Copies a run (its experts, banks and routers; not its evaluation), retrains one axis's expert there with
``train.objective.<axis>: dpo`` at the run's own budget (``train.*``), and scores the base model, the run's SFT
expert and the DPO expert on the selection items of :mod:`mixing_selection` (none of them an evaluation prompt;
answers cached there, so run that first): the helpful equal-length win rate, the safe rate on harmless and
shifted harmful prompts, and TI, each DPO − base as a paired 95 % interval.

    python benchmarks/preference_check.py --run runs/study --axis honest --copy runs/study-dpo-honest
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
from pathlib import Path

from alignx.config import load_config
from alignx.data.splits import preference_pairs
from alignx.eval.judges import JudgeSettings, load_judge
from alignx.eval.statistics import paired_difference
from alignx.generate import AlignX
from alignx.models.loading import load_base_model
from alignx.run import RunDir, read_json
from alignx.stage1.preference import train_preference_expert

_spec = importlib.util.spec_from_file_location("mixing_selection", Path(__file__).with_name("mixing_selection.py"))
selection = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(selection)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, type=Path, help="a run that mixing_selection.py has scored")
    parser.add_argument("--axis", default="honest", choices=("harmless", "honest"))
    parser.add_argument("--copy", required=True, type=Path, help="where the run with the DPO expert goes")
    parser.add_argument("--items", type=int, default=100)
    args = parser.parse_args()
    if not args.copy.exists():
        shutil.copytree(args.run, args.copy, ignore=shutil.ignore_patterns("eval", "axis-loss", "mixing-selection", "run.lock"))
        shutil.rmtree(args.copy / "experts" / args.axis)
    config = load_config(str(args.run / "config.yaml"), [f"run_dir={args.copy}", f"train.objective.{args.axis}=dpo"])
    copy = RunDir(args.copy)
    if not copy.has_trained_expert(args.axis):
        train_preference_expert(config, copy, args.axis, load_base_model(config.model, for_training=True),
                                preference_pairs(args.axis, config.data), resume=True)
    items = selection.selection_items(AlignX.from_run(args.run, method="alignx"), load_config(str(args.run / "config.yaml")),
                                      args.items)
    settings = JudgeSettings(data_dir=config.data.resolved_data_dir())
    judges = {task: load_judge("offline", task, settings) for task in ("helpfulness", "safety", "truth", "info")}
    every = [i for name in selection.SETS for i in items[name]]
    expert = f"expert-{args.axis}"
    samples = {}
    for name, root, method in (("base", args.run, "base"), (expert, args.run, expert), (f"{expert} (dpo)", args.copy, expert)):
        aligner = AlignX.from_run(root, method=method)  # the run's own answers come from mixing_selection.py's cache
        answered = selection.answers(aligner, name, every, root / "mixing-selection" / "answers.jsonl",
                                     config.eval.max_new_tokens, 32)
        samples[name] = selection.judged_samples(items, answered, judges, aligner.loaded.tokenizer)
        print(f"{name}: " + "  ".join(f"{k}={100 * s.value():.1f}" for k, s in samples[name].items()))
    for key in ("win", "safe", "ti"):
        d = paired_difference([samples[f"{expert} (dpo)"][key]], [samples["base"][key]], 1000, 0)
        print(f"dpo - base {key}: {100 * d['value']:+.1f} [{100 * d['ci'][0]:+.1f}, {100 * d['ci'][1]:+.1f}]")
    summary = read_json(copy.summary_path(args.axis))
    print(f"held_out_reward_accuracy={summary['held_out_reward_accuracy']:.3f} pairs={summary['held_out_pairs']} "
          f"train_seconds={summary['train_seconds']:.0f}")


if __name__ == "__main__":
    main()
