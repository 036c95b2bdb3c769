"""``alignx lm-eval``: lm-evaluation-harness's own command line with the ``alignx`` model registered."""

from __future__ import annotations

import argparse

from alignx.errors import AlignXError


def register(verbs) -> None:
    parser = verbs.add_parser(
        "lm-eval", help="run any lm-evaluation-harness task on a routed model (the alignx lm-eval model)",
        description="lm-eval's command line, unchanged, with the `alignx` model registered: --model alignx "
        "--model_args run=<run>,method=<method>[,mode=soft|top1|threshold][,route=last|context]. Each request is "
        "routed on its own context (see alignx.eval.lm_harness). Needs the extra: pip install 'alignx[lm-eval]'.",
        epilog="example:\n  alignx lm-eval --model alignx --model_args run=runs/demo,method=alignx --tasks truthfulqa_mc2",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("lm_eval_args", nargs=argparse.REMAINDER, help="lm-eval's arguments (see `lm_eval --help`)")


def run(args: argparse.Namespace) -> int:
    try:
        from alignx.eval.lm_harness import main
    except ImportError as exc:
        raise AlignXError(f"alignx lm-eval needs lm-evaluation-harness ({exc.name} is missing): pip install 'alignx[lm-eval]'") from None
    main(args.lm_eval_args)
    return 0
