"""``alignx lm-eval``: lm-evaluation-harness's own command line with the ``alignx`` model registered."""

from __future__ import annotations

import argparse

from alignx.errors import AlignXError

EXAMPLE = "alignx lm-eval --model alignx --model_args run=runs/mine,method=alignx --tasks truthfulqa_mc2"


def register(verbs) -> None:
    parser = verbs.add_parser(
        "lm-eval", help="run any lm-evaluation-harness task on a routed model (the alignx lm-eval model)",
        description="lm-eval's command line, unchanged, with the `alignx` model registered: --model alignx "
        "--model_args run=<run>,method=<method>[,mode=soft|top1|threshold][,route=last|context]. Each request is "
        "routed on its own context (see alignx.eval.lm_harness); method=oracle is refused (lm-eval requests carry "
        "no gold axis). Needs the extra: pip install 'alignx[lm-eval]'.",
        epilog=f"example:\n  {EXAMPLE}\n\n"
        "lm-eval's own options: alignx lm-eval -- --help (lm-eval 0.4.13: alignx lm-eval run --help).\n"
        "A local task file: add --include_path <dir>; a task there overrides lm-eval's task of the same name.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("lm_eval_args", nargs=argparse.REMAINDER, help="lm-eval's arguments, passed on unchanged")


def passthrough(argv: list[str]) -> argparse.Namespace | None:
    """``alignx lm-eval ARGS`` as parsed arguments, ARGS untouched; None for ``alignx lm-eval [-h|--help]``.

    argparse cannot give a verb the rest of a line that starts with an option (``--model`` would be an
    'unrecognized argument' of alignx's), so lm-eval's line never goes through alignx's parser."""
    if argv[:1] != ["lm-eval"] or len(argv) < 2 or argv[1] in ("-h", "--help"):
        return None
    return argparse.Namespace(command="lm-eval", lm_eval_args=argv[2:] if argv[1] == "--" else argv[1:])


def run(args: argparse.Namespace) -> int:
    try:
        from alignx.eval.lm_harness import main
    except ImportError as exc:
        raise AlignXError(f"alignx lm-eval needs lm-evaluation-harness ({exc.name} is missing): pip install 'alignx[lm-eval]'") from None
    main(args.lm_eval_args)
    return 0
