"""The ``alignx`` command: one subcommand per pipeline verb.

Every subcommand takes ``--config <yaml>`` plus ``section.key=value`` overrides. A mistake a user can fix
(an unknown key, a missing file, a model that is not there) prints one line and exits with status 2;
anything else is a bug and shows its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import sys
from pathlib import Path

from tqdm.auto import tqdm

from alignx import __version__
from alignx.axes import parse_axes
from alignx.config import AlignXConfig, load_config
from alignx.errors import AlignXError

_EPILOG = """\
pipeline: data -> stage1 (per-axis LoRA experts + task features) -> stage2 (MoCaE router) -> generate/eval/serve

examples:
  alignx data check
  alignx stage1 --config configs/demo.yaml
  alignx stage1 --config configs/default.yaml --axes helpful,honest train.lr=1e-4 run_dir=runs/mine
  alignx stage1 task-vector --run runs/mine --axis harmless
  alignx stage2 --run runs/mine
  alignx stage2 --run runs/mine stage2.name=no-fractal stage2.use_fractal=false
"""


# The command-line modules (this one and each verb's ``cli`` module below) import the pipeline inside the
# function that runs a verb, never at module level: torch and transformers alone take seconds to import, and
# `alignx --help`, a mistyped argument or a config error should answer at once. Verbs whose arguments and
# code live in their own package have ``register(verbs)`` and ``run(args) -> int``.
_PACKAGE_VERBS = {"judge": "alignx.eval.judges.cli", "eval": "alignx.eval.cli", "lm-eval": "alignx.eval.lm_eval_cli",
                  "serve": "alignx.serving.cli"}


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config (see configs/); defaults are METHOD.md's")
    parser.add_argument(
        "overrides", nargs="*", metavar="section.key=value",
        help="override any config field, e.g. train.lr=1e-4 data.max_rows_per_axis=64 run_dir=runs/x",
    )


def add_base_model_arguments(parser: argparse.ArgumentParser, *, model: bool = True) -> None:
    """The base-model flags of every verb that loads a run (stage2, baseline, generate, serve; eval without
    ``--model``): only these, never the run's own config, let a model run its own code
    (alignx.models.loading.run_model_config)."""
    if model:
        parser.add_argument("--model", help="load the base model from here instead of where the run's config says "
                            "(hub id, local directory, .gguf file, or smollm2-135m)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="let the base model run its own code (a run's config.yaml can never turn this on)")


def _run_base_model(config: AlignXConfig, run_root: Path, args: argparse.Namespace) -> AlignXConfig:
    """``config``, read for the run at ``run_root``, with the base model the user's --model and --trust-remote-code say
    (alignx.models.loading.run_model_config): what Stage 2 and the baselines load."""
    from alignx.models.loading import run_model_config

    return dataclasses.replace(config, model=run_model_config(config.model, run_root, model=args.model,
                                                              trust_remote_code=args.trust_remote_code))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="alignx",
        description="Align an open LLM on helpful, harmless and honest at once: per-axis LoRA experts "
        "mixed per prompt by a calibrated router (MoCaE).",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"alignx {__version__}")
    verbs = parser.add_subparsers(dest="command", metavar="<command>")

    data = verbs.add_parser("data", help="inspect the data sets and their canonical splits")
    data_verbs = data.add_subparsers(dest="data_command", metavar="<action>")
    check = data_verbs.add_parser(
        "check", help="print every split's row count, skipped bad rows and why, and its hash",
        description="Load every axis's training split and every evaluation split from data.data_dir "
        "($ALIGNX_DATA_DIR) or the Hugging Face hub, and report rows, skipped rows by reason, and hashes.",
    )
    _add_config_arguments(check)

    stage1 = verbs.add_parser(
        "stage1", help="train one LoRA expert per axis and build the task-feature banks",
        description="Stage 1: train one LoRA expert per axis, independently from the same frozen base, each "
        "with its axis's injection prompt; then pool the base's hidden states over each axis's training "
        "prompts into a task-feature bank. Finished axes are skipped; --resume continues an interrupted one. "
        "Subcommand `task-vector` writes an expert's task vector.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="run directory layout: see `python -c 'import alignx.run; help(alignx.run)'` or docs/cli.md",
    )
    _add_config_arguments(stage1)
    stage1.add_argument("--axes", help="comma-separated subset of helpful,harmless,honest (default: all)")
    stage1.add_argument("--run", help="run directory (same as run_dir=...)")
    stage1.add_argument("--model", help="hub id, local directory, .gguf file, or smollm2-135m (same as model.name=...)")
    stage1.add_argument("--resume", action="store_true", help="continue an interrupted training from its last checkpoint")

    stage2 = verbs.add_parser(
        "stage2", help="train the MoCaE router and its calibrators on a Stage 1 run; report routing metrics",
        description="Stage 2: fit the feature space, the fractal and natural calibrators and the router on the "
        "run's task-feature banks (experts stay frozen), fit the output temperature on a held-out calibration "
        "split, train the uncalibrated router as the baseline, and measure both on held-out evaluation prompts "
        "(accuracy, ECE, Brier, NLL, misrouting per axis; reliability diagrams). The config is the run's own "
        "config.yaml unless --config is given; stage2.* overrides select ablations (e.g. stage2.name=no-fractal "
        "stage2.use_fractal=false).",
    )
    _add_config_arguments(stage2)
    stage2.add_argument("--run", required=True, help="run directory made by `alignx stage1`")
    stage2.add_argument("--force", action="store_true", help="retrain even if the report already covers these settings")
    add_base_model_arguments(stage2)

    generate = verbs.add_parser(
        "generate", help="generate with the experts: routed by MoCaE, or any baseline method",
        description="Generate answers with a run's experts. --method alignx routes each prompt with MoCaE "
        "(one partial prefill, then per-example expert weights in one batch); other methods: base, "
        "expert-<axis>, merge-linear, trinityx, arrow (PEFT's training-free per-token Arrow router over the experts), "
        "the baselines of `alignx baseline` (sft-mix, sft-sequential, merge-ties, moe-dense), and every router "
        "trained by `alignx stage2` (moe-uncalibrated, paper, ablations). "
        "Output lines add response, method and, for weighted methods, the final weights per axis. An existing "
        "--output is resumed: ids already there are not generated again.",
    )
    generate.add_argument("--run", required=True, help="run directory")
    generate.add_argument("--method", default="alignx", help="alignx (default), base, expert-<axis>, merge-linear, trinityx, arrow, sft-mix, sft-sequential, merge-ties, moe-dense, moe-uncalibrated, paper, ...")
    source = generate.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    source.add_argument("--input", help='JSONL file of {"id": ..., "prompt": ...} lines')
    generate.add_argument("--output", help="JSONL file to write (default: print to stdout)")
    generate.add_argument("--mode", default="router", help="router (default): the router's own mixing weights (stage2.mixing) | soft: mix with the calibrated probabilities (the paper) | top1 | threshold")
    generate.add_argument("--threshold", type=float, default=0.1, help="weight floor of --mode threshold")
    generate.add_argument("--max-new-tokens", type=int, default=128)
    generate.add_argument("--batch-size", type=int, default=8)
    generate.add_argument("--sample", action="store_true", help="seeded sampling instead of greedy decoding")
    generate.add_argument("--temperature", type=float, default=0.7)
    generate.add_argument("--top-p", type=float, default=0.9)
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--explain", action="store_true", help="print the router, fractal and natural distributions, the calibrated probabilities and the weights the experts were mixed with (final)")
    add_base_model_arguments(generate)

    baseline = verbs.add_parser(
        "baseline", help="train or merge a baseline that needs its own artifacts (sft-mix, sft-sequential, merge-ties, moe-dense)",
        description="Baselines of METHOD.md section 4 with artifacts of their own, written to "
        "experts/<method>/adapter of the run: sft-mix (one LoRA on all axes' data, same total budget as the "
        "experts), sft-sequential (the authors' stacked scheme: each axis's LoRA trained on top of the previous) "
        "merge-ties (PEFT TIES merge of the three experts) and moe-dense (token-level top-2 MoE of three dense "
        "expert FFNs per layer; only its token routers train, same budget, saved as "
        "experts/moe-dense/routers.safetensors). Then use them with "
        "`alignx generate --method <method>`. Weight-only baselines (base, expert-<axis>, merge-linear, "
        "trinityx, moe-uncalibrated) need no step here.",
    )
    baseline.add_argument("--run", required=True, help="run directory made by `alignx stage1`")
    baseline.add_argument("--method", required=True, help="sft-mix, sft-sequential, merge-ties, moe-dense (comma-separated for several)")
    baseline.add_argument("--density", type=float, default=0.2, help="share of each task vector TIES keeps")
    baseline.add_argument("--resume", action="store_true", help="continue an interrupted sft-mix, sft-sequential or moe-dense training")
    add_base_model_arguments(baseline)

    vector = verbs.add_parser(
        "task-vector", help="write an expert's task vector (same as: alignx stage1 task-vector)",
        description="Write experts/<axis>/task_vector.safetensors: (alpha/r)·B·A for every target module, "
        "keyed like the base model's weights.",
    )
    vector.add_argument("--run", required=True, help="run directory made by `alignx stage1`")
    vector.add_argument("--axis", required=True, help="helpful, harmless or honest (comma-separated for several)")
    export = verbs.add_parser(
        "export", help="write a run's experts, routers and model card in the Hugging Face hub layout",
        description="Write the three experts as PEFT adapters, every trained router (safetensors + JSON), the "
        "run's config, manifest and evaluation results, and a model card (README.md) to --output. The output is "
        "a run directory without training state: AlignX.from_pretrained(<output>), `alignx generate --run "
        "<output>` and `alignx serve --run <output>` load it, and `huggingface-cli upload` shares it.",
        epilog="example:\n  alignx export --run runs/study --output exports/alignx-smollm2\n"
        "  python -c \"from alignx.generate import AlignX; AlignX.from_pretrained('exports/alignx-smollm2')\"",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    export.add_argument("--run", required=True, help="run directory with the three experts (alignx stage1)")
    export.add_argument("--output", required=True,
                        help="a new or empty directory, or an earlier export to replace (nothing else is written over)")
    for module in _PACKAGE_VERBS.values():
        importlib.import_module(module).register(verbs)
    return parser


def _normalise_argv(argv: list[str]) -> list[str]:
    """``alignx stage1 task-vector ...`` is a sub-verb of stage1; argparse sees it as its own command."""
    if len(argv) >= 2 and argv[0] == "stage1" and argv[1] == "task-vector":
        return ["task-vector", *argv[2:]]
    return argv


def main(argv: list[str] | None = None) -> int:
    argv = _normalise_argv(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    from alignx.eval.lm_eval_cli import passthrough  # lm-eval's own line bypasses this parser

    args = passthrough(argv) or parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return _dispatch(args, parser)
    except AlignXError as exc:
        print(f"alignx: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("alignx: interrupted; finished work is saved — rerun the same command (with --resume) to continue", file=sys.stderr)
        return 130


def _dispatch(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.command == "data":
        if args.data_command != "check":
            parser.parse_args(["data", "--help"])
        from alignx.data.splits import check_all, format_check_report

        config = load_config(args.config, args.overrides)
        print(format_check_report(check_all(config.data)))
        return 0
    if args.command == "stage1":
        overrides = list(args.overrides)
        if args.axes:
            overrides.append(f"axes={args.axes}")
        if args.run:
            overrides.append(f"run_dir={args.run}")
        if args.model:
            overrides.append(f"model.name={args.model}")
        config = load_config(args.config, overrides)
        from alignx.stage1.pipeline import run_stage1

        run_stage1(config, resume=args.resume)
        return 0
    if args.command == "stage2":
        from alignx.run import RunDir
        from alignx.stage2.pipeline import run_stage2

        run = RunDir(args.run)
        overrides = [*args.overrides, f"run_dir={run.root}"]
        config = load_config(args.config, overrides) if args.config else run.load_config(overrides)
        run_stage2(_run_base_model(config, run.root, args), force=args.force)
        return 0
    if args.command == "baseline":
        from alignx.baselines import TRAINED_METHODS
        from alignx.baselines.merge_ties import build_merge_ties
        from alignx.baselines.moe_dense import train_moe_dense
        from alignx.baselines.sft_mix import train_sft_mix
        from alignx.baselines.sft_sequential import train_sft_sequential
        from alignx.run import RunDir

        run = RunDir(args.run)
        config = _run_base_model(run.load_config(), run.root, args)
        methods = [m.strip() for m in args.method.split(",") if m.strip()]
        unknown = [m for m in methods if m not in TRAINED_METHODS]
        if unknown or not methods:
            raise AlignXError(f"unknown baseline {', '.join(unknown) or '(none)'}; valid: {', '.join(TRAINED_METHODS)}")
        with run.lock():
            for method in methods:
                if method == "sft-mix":
                    train_sft_mix(run, config, resume=args.resume)
                elif method == "sft-sequential":
                    train_sft_sequential(run, config, resume=args.resume)
                elif method == "moe-dense":
                    train_moe_dense(run, config, resume=args.resume)
                else:
                    build_merge_ties(run, config, density=args.density)
        return 0
    if args.command == "export":
        from alignx.export import export_run
        from alignx.run import RunDir

        output = export_run(RunDir(args.run), Path(args.output))
        print(f"[export] {args.run} -> {output} (model card: {output / 'README.md'})")
        return 0
    if args.command == "generate":
        return _generate(args)
    if args.command in _PACKAGE_VERBS:
        return importlib.import_module(_PACKAGE_VERBS[args.command]).run(args)
    if args.command == "task-vector":
        from alignx.run import RunDir, atomic_save_safetensors
        from alignx.stage1.task_vector import task_vector

        run = RunDir(args.run)
        for axis in parse_axes(args.axis):
            if not run.has_adapter(axis):
                raise AlignXError(f"no trained {axis} expert in {run.root}; run `alignx stage1 --run {run.root}` first")
            vector = task_vector(run.adapter_dir(axis))
            atomic_save_safetensors(vector, run.task_vector_path(axis), {"axis": axis})
            print(f"[stage1] {axis}: task vector of {len(vector)} modules -> {run.task_vector_path(axis)}")
        return 0
    raise AssertionError(f"unhandled command {args.command}")


def _generate(args: argparse.Namespace) -> int:
    from alignx.generate import AlignX

    if args.max_new_tokens < 1 or args.batch_size < 1:
        raise AlignXError("--max-new-tokens and --batch-size must be >= 1")
    items = [{"id": i, "prompt": p} for i, p in enumerate(args.prompt or [])] or _read_prompts(Path(args.input))
    done = set()
    output = Path(args.output) if args.output else None
    if output is not None and output.is_file():
        for line in output.read_text().splitlines():
            try:
                done.add(json.dumps(json.loads(line)["id"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a line torn by an interruption is generated again
    todo = [item for item in items if json.dumps(item["id"]) not in done]
    aligner = AlignX.from_run(args.run, method=args.method, mode=args.mode, floor=args.threshold, model=args.model,
                              trust_remote_code=args.trust_remote_code)
    bar = tqdm(total=len(items), initial=len(items) - len(todo), desc=f"generate {args.method}", unit="prompt",
               disable=output is None, dynamic_ncols=True)
    for start in range(0, len(todo), args.batch_size):
        batch = todo[start : start + args.batch_size]
        generations = aligner.generate(
            [item["prompt"] for item in batch], max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
            do_sample=args.sample, temperature=args.temperature, top_p=args.top_p, seed=args.seed + start,
        )
        lines = []
        for item, g in zip(batch, generations):
            row = {**item, "response": g.response, "method": g.method}
            if g.weights is not None:
                row["weights"] = g.weights
            lines.append(json.dumps(row, ensure_ascii=False))
            if args.explain:
                print(_explain_line(item, g), file=sys.stderr if output is None else sys.stdout)
        if output is None:
            print("\n".join(lines))
        else:
            output.parent.mkdir(parents=True, exist_ok=True)
            with open(output, "a") as handle:  # one flushed append per batch: an interruption loses at most a batch
                handle.write("".join(line + "\n" for line in lines))
        bar.update(len(batch))
    bar.close()
    return 0


def _read_prompts(path) -> list[dict]:
    from alignx.run import jsonl_objects

    items = []
    for number, row in jsonl_objects(path):
        if not isinstance(row.get("prompt"), str) or not row["prompt"].strip() or "id" not in row:
            raise AlignXError(f'{path}:{number} must be an object with "id" and a non-empty string "prompt"')
        items.append(row)
    if not items:
        raise AlignXError(f"{path} holds no prompts")
    return items


def _explain_line(item: dict, generation) -> str:
    def fmt(dist):
        return " ".join(f"{axis}={value:.3f}" for axis, value in dist.items())

    e = generation.explanation
    lines = [f"[explain] id={item['id']} prompt={item['prompt'][:70]!r}"]
    for key in ("router", "fractal", "typicality", "natural", "probabilities", "final"):
        if key in e:
            lines.append(f"  {key:<13} {fmt(e[key])}")
    if e:
        lines.append(f"  ood           {e['ood']}")
    elif generation.weights is not None:
        lines.append(f"  fixed         {fmt(generation.weights)}")
    return "\n".join(lines)
