"""The axis-loss matrix of a run: Axis Collapse measured without generation (``alignx.eval.axis_loss``).

Per method and axis, the mean per-token NLL of the content tokens of held-out gold responses (the template's
end-of-turn scored apart and printed in its own table), teacher-forced, with each method's own
weights for that prompt: helpful = Alpaca rows outside the training sample, harmless = BeaverTails eval-half
responses labelled safe, honest = the correct answers of TruthfulQA 409-817. Forgetting shows as a method's loss
on an axis above that axis's own expert; misrouting as a router's loss above the oracle's. Every difference to
``alignx`` comes with a paired bootstrap 95 % interval (the same items for both). Lower is better throughout.

Methods: every one the run has (base, the three experts, oracle, best-expert, merge-linear, trinityx, the
trained baselines, every Stage 2 router, and PEFT's Arrow unless ``--no-arrow``), or ``--methods``; with
``--quick``, the last line's five (the experts come with the oracle).
``best-expert`` is the single expert with the lowest mean over axes (one adapter for every prompt), chosen on the
other half of the items for each half (cross-fitted), so it is not the minimum of three noisy means.

Per-item losses are cached under ``<run>/axis-loss/``: an interrupted run resumes. Last line:
``alignx=<mean NLL over axes> oracle=<x> sft_mix=<x> base=<x> best_expert=<x>`` (``sft_mix`` absent when the run
has not trained that baseline).

    python benchmarks/axis_loss.py --run runs/demo --quick      # 50 items per axis, five methods: under 5 minutes
    python benchmarks/axis_loss.py --run runs/study             # 400 per axis (harmless has 586), every method
"""

from __future__ import annotations

import argparse
import time

import torch

from alignx.axes import AXES
from alignx.eval.axis_loss import axis_loss_matrix
from alignx.generate import ARROW, ORACLE, available_methods
from alignx.run import RunDir

HEADLINE = ("alignx", ORACLE, "sft-mix", "base", "best-expert")


def default_methods(run: RunDir, arrow: bool) -> list[str]:
    methods = [m for m in available_methods(run) if m != ORACLE and (arrow or m != ARROW)]
    if not (run.root / "stage2" / "trinityx.json").is_file():
        methods.remove("trinityx")
    return ["alignx", ORACLE, "best-expert", *(m for m in methods if m != "alignx")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/demo", help="a run after `alignx stage1` and `alignx stage2`")
    parser.add_argument("--quick", action="store_true", help="50 items per axis (default 400) and the last line's methods")
    parser.add_argument("--items", type=int, help="items per axis (overrides --quick)")
    parser.add_argument("--methods", help="comma-separated methods (default: every method of the run)")
    parser.add_argument("--no-arrow", action="store_true", help="leave PEFT's Arrow out (it runs in fp32, the slowest)")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    started = time.time()
    run = RunDir(args.run)
    config = run.load_config()
    items = args.items or (50 if args.quick else 400)
    if args.methods:
        methods = args.methods.split(",")
    else:
        methods = default_methods(run, not args.no_arrow)
        if args.quick:
            methods = [m for m in methods if m in HEADLINE]
    print(f"cpu={torch.backends.cpu.get_cpu_capability()} threads={torch.get_num_threads()} run={run.root} "
          f"items_per_axis={items} methods={','.join(methods)}")
    result = axis_loss_matrix(run, config, methods, items, batch_size=args.batch_size, max_length=config.train.max_length)
    matrix, paired = result["matrix"], result.get("paired_to_alignx", {})
    print(f"\nmean per-token NLL of the content tokens of held-out gold responses (items: {result['items']}); "
          "Δ = method − alignx, paired bootstrap 95 % CI, * = excludes 0")
    print(f"{'method':<28}" + "".join(f"{a:>10}" for a in [*AXES, "mean"]) + "   Δ mean vs alignx")
    for method, row in matrix.items():
        delta = paired.get(method, {}).get("mean")
        note = "" if delta is None else (f"   {delta['value']:+.4f} [{delta['ci'][0]:+.4f}, {delta['ci'][1]:+.4f}]"
                                         + (" *" if delta["excludes_zero"] else ""))
        name = f"{method} ({row['expert']})" if "expert" in row else method
        print(f"{name:<28}" + "".join(f"{row[a]:>10.4f}" for a in [*AXES, "mean"]) + note)
    print("\nend-of-turn NLL per answer (not in the matrix above; a fall here is learning when to stop)")
    for method, row in result["end_of_turn"].items():
        print(f"{method:<28}" + "".join(f"{row[a]:>10.4f}" for a in [*AXES, "mean"]))
    print(f"wall_s={time.time() - started:.0f}")
    print(" ".join(f"{m.replace('-', '_')}={matrix[m]['mean']:.4f}" for m in HEADLINE if m in matrix))


if __name__ == "__main__":
    main()
