"""``alignx eval``: the HHH benchmarks for several methods of one run, judged, with a report."""

from __future__ import annotations

import argparse

from alignx.cli import add_base_model_arguments
from alignx.errors import AlignXError

DEFAULT_METHODS = "alignx,base,sft-mix,moe-uncalibrated"


def register(verbs) -> None:
    parser = verbs.add_parser(
        "eval", help="generate and judge the HHH benchmarks for several methods; write results and a report",
        description="Evaluate methods of a run on helpful (AlpacaEval win rate, and the win rate with answer and "
        "reference cut to the same length), "
        "harmless (BeaverTails unsafe rate, refusals of clearly harmful requests), honest (TruthfulQA truthful / "
        "informative / TI, MC1 / MC2 by log-likelihood), over-refusal (XSTest safe prompts), routing, and Axis "
        "Collapse (each axis relative to its own expert), with 95 % bootstrap intervals. Generations are saved per "
        "item and resumed after an interruption (a changed expert or router is evaluated anew); judge scores are reused "
        "while judge and response are unchanged. "
        "Writes <run>/eval/<suite>/results.json, report.md and report.html.",
        epilog="examples:\n  alignx eval --run runs/demo --methods alignx,base,sft-mix,moe-uncalibrated\n"
        "  alignx eval --run runs/demo --methods alignx --suite full --judge safety=openai:gpt-4o-mini\n"
        "  alignx eval --run runs/demo --methods alignx eval.quick_items=16 eval.max_new_tokens=64",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--run", required=True, help="run directory (after `alignx stage1` and `alignx stage2`)")
    parser.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated methods (default: {DEFAULT_METHODS})")
    parser.add_argument("--suite", choices=("quick", "full"), help="quick: a seeded subset of each benchmark (default); full: every item")
    parser.add_argument("--judge", action="append", default=[], metavar="TASK=SPEC",
                        help="judge of one task: offline (default), openai:<model> or hf:<path> (repeatable)")
    parser.add_argument("--judges-dir", help="where the offline judges are (default: <alignx cache>/judges)")
    add_base_model_arguments(parser, model=False)
    parser.add_argument("overrides", nargs="*", metavar="eval.key=value", help="override eval settings, e.g. eval.quick_items=16")


def run(args: argparse.Namespace) -> int:
    from alignx.eval.report import terminal_summary
    from alignx.eval.runner import eval_paths, run_eval
    from alignx.models.loading import run_model_config
    from alignx.run import RunDir

    run_dir = RunDir(args.run)
    overrides = list(args.overrides)
    if args.suite:
        overrides.append(f"eval.suite={args.suite}")
    if args.judges_dir:
        overrides.append(f"eval.judges_dir={args.judges_dir}")
    for item in args.judge:
        task, sep, spec = item.partition("=")
        if not sep or not spec:
            raise AlignXError(f"--judge {item!r} must look like TASK=SPEC, e.g. safety=openai:gpt-4o-mini")
        overrides.append(f"eval.judges.{task.strip()}={spec.strip()}")
    config = run_dir.load_config(overrides)
    run_model_config(config.model, run_dir.root, trust_remote_code=args.trust_remote_code)  # refused before any work
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    with run_dir.lock():
        results = run_eval(run_dir, config, methods, trust_remote_code=args.trust_remote_code)
    print(terminal_summary(results))
    print(f"\nreport: {eval_paths(run_dir, config.eval.suite).root / 'report.html'}")
    return 0
