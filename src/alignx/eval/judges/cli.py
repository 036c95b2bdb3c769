"""``alignx judge train|validate|score``: the offline judges' verbs (other judge kinds score only)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from alignx.errors import AlignXError

# The headline figures, in this order; each is "<name> accuracy=<x>" on its own line. Then the win-rate
# figures, "<name> points=<x>" (HEADLINE_POINTS first), then baselines and per-system figures.
FIGURES = ("safety", "truth", "truth_nonverbatim", "info", "info_nonverbatim", "helpfulness", "helpfulness_lenmatched",
           "helpfulness_loo", "helpfulness_new_reference", "helpfulness_cut36", "helpfulness_cut36_new_reference", "refusal")
# helpfulness_wr_error: the largest win-rate error over every held-out check (a held-out system against the
# evaluation's reference, and against a reference set the judge was not fit on), then its two parts
HEADLINE_POINTS = ("helpfulness_wr_error", "helpfulness_wr_error_same_reference", "helpfulness_wr_error_new_reference",
                   "helpfulness_cut36_wr_error", "helpfulness_lc_error", "helpfulness_wr_corrected_error")


def register(verbs) -> None:
    judge = verbs.add_parser(
        "judge", help="train, validate and run the judges (safety, truth, info, helpfulness, refusal)",
        description="Offline judges trained on METHOD.md's judge data and validated on labels they never saw "
        "(BeaverTails eval half, TruthfulQA questions 409-817; AlpacaEval and XSTest answers of a held-out model to "
        "held-out prompts).",
    )
    actions = judge.add_subparsers(dest="judge_command", metavar="<action>")
    train = actions.add_parser("train", help="train and validate the offline judges (finished ones are kept)",
                               description="Fit each judge, validate it, and store it (skops + JSON metadata) in the "
                               "judges directory. Judges already trained by the same recipe on the current data are kept "
                               "unless --force; embeddings are cached there too.")
    validate = actions.add_parser("validate", help="measure the stored judges again on their held-out labels",
                                  description="Print '<figure> accuracy=<x>' per line: " + ", ".join(FIGURES)
                                  + "; then '<figure> points=<x>': " + ", ".join(HEADLINE_POINTS)
                                  + " (largest win-rate error in points over the held-out checks: a held-out generator "
                                  "against the evaluation's reference, and <system>_vs_<reference>, a reference set the "
                                  "judge was not fit on; cut36: both texts cut to about 48 tokens) and per check; then baselines.")
    for parser in (train, validate):
        parser.add_argument("--task", help="comma-separated subset of safety,truth,info,helpfulness,refusal (default: all)")
        parser.add_argument("--judges-dir", help="where judges are stored (default: <alignx cache>/judges)")
        parser.add_argument("--data-dir", help="judge data laid out like shared/data (default: $ALIGNX_DATA_DIR, else the hub)")
    train.add_argument("--force", action="store_true", help="retrain judges that are already trained on the current data")
    train.add_argument("--encoder", help="replace every recipe's text encoder (default: each recipe's own: the embedded "
                       "SmolLM2's hidden states for safety, all-MiniLM-L6-v2 for the others); hashing-<dim> needs no "
                       "model (fast, less accurate)")
    score = actions.add_parser("score", help="score a JSONL file of {prompt, response} lines with a judge",
                               description='Add "judge", "task", "score" (probability of the task\'s positive class) and '
                               '"label" to every line. Optional fields: reference (helpfulness), correct_answers and '
                               "incorrect_answers (truth, info); when missing they are looked up in AlpacaEval / TruthfulQA "
                               "by the prompt text.")
    score.add_argument("--judge", default="offline", help="offline (default), openai:<model> or hf:<path-or-hub-id>")
    score.add_argument("--task", required=True, help="safety, truth, info, helpfulness or refusal")
    score.add_argument("--input", required=True, help='JSONL of {"prompt": ..., "response": ...} (what `alignx generate` writes)')
    score.add_argument("--output", required=True, help="JSONL to write")
    score.add_argument("--judges-dir", help="where offline judges are stored (default: <alignx cache>/judges)")
    score.add_argument("--data-dir", help="judge data laid out like shared/data (default: $ALIGNX_DATA_DIR, else the hub)")


def _settings(args: argparse.Namespace):
    from alignx.eval.judges import JudgeSettings

    return JudgeSettings(judges_dir=Path(args.judges_dir) if args.judges_dir else None,
                         data_dir=Path(args.data_dir) if args.data_dir else None)


def _tasks(value: str | None) -> list[str]:
    from alignx.eval.judges import JUDGE_TASKS, check_task

    tasks = [check_task(t.strip()) for t in value.split(",") if t.strip()] if value else list(JUDGE_TASKS)
    if not tasks:
        raise AlignXError(f"--task names no task; valid tasks: {', '.join(JUDGE_TASKS)}")
    return tasks


def run(args: argparse.Namespace) -> int:
    if args.judge_command == "train":
        return _train(args)
    if args.judge_command == "validate":
        return _validate(args)
    if args.judge_command == "score":
        return _score(args)
    raise AlignXError("missing action: use `alignx judge train`, `alignx judge validate` or `alignx judge score`")


def _train(args: argparse.Namespace) -> int:
    from alignx.eval.judges.offline import train_judge

    settings = _settings(args)
    started = time.perf_counter()
    for task in _tasks(args.task):
        task_started = time.perf_counter()
        meta, trained = train_judge(task, settings, encoder_spec=args.encoder, force=args.force)
        figures = " ".join(f"{name}={value:.4f}" for name, value in meta["validation"]["accuracy"].items())
        state = f"trained in {time.perf_counter() - task_started:.0f}s" if trained else "already trained on this data (--force retrains)"
        print(f"[judge] {task}: {state}; held-out accuracy {figures} -> {settings.resolved_judges_dir() / (task + '.json')}", file=sys.stderr)
    print(f"[judge] done in {time.perf_counter() - started:.0f}s; regenerate the figures with `alignx judge validate`", file=sys.stderr)
    return 0


def format_validation(results: dict) -> str:
    """Headline figures first (FIGURES order), the win-rate errors (HEADLINE_POINTS, then per generator), then
    every baseline and per-system figure, one per line."""
    accuracy = {name: value for result in results.values() for name, value in result.accuracy.items()}
    points = {name: value for result in results.values() for name, value in result.points.items()}
    extra = {name: value for result in results.values() for name, value in result.extra.items()}
    lines = [f"{name} accuracy={accuracy[name]:.4f}" for name in FIGURES if name in accuracy]
    lines += [f"{name} points={points[name]:.2f}" for name in HEADLINE_POINTS if name in points]
    lines += [f"{name} points={value:.2f}" for name, value in points.items() if name not in HEADLINE_POINTS]
    lines += [f"{name} accuracy={value:.4f}" for name, value in extra.items()]
    return "\n".join(lines)


def _validate(args: argparse.Namespace) -> int:
    from alignx.eval.judges.offline import revalidate

    settings = _settings(args)
    results = {task: revalidate(task, settings) for task in _tasks(args.task)}
    for task, result in results.items():
        sizes = ", ".join(f"{name} n={n}" for name, n in result.n.items())
        print(f"[judge] {task}: {result.method}; {sizes}", file=sys.stderr)
    print(format_validation(results))
    return 0


def read_items(path: Path, task: str, root: Path | None) -> tuple[list[dict], list]:
    """The lines of ``path`` and their JudgeItems, completed with the references ``task`` needs; a line
    that cannot be scored is an error naming it."""
    from alignx.eval.judges.data import complete_item
    from alignx.eval.judges import JudgeItem

    from alignx.run import jsonl_objects

    rows, items = [], []
    for number, row in jsonl_objects(path):
        if not isinstance(row.get("prompt"), str) or not isinstance(row.get("response"), str):
            raise AlignXError(f'{path}:{number} must be an object with string "prompt" and "response" fields')
        answers = {}
        for key in ("correct_answers", "incorrect_answers"):
            value = row.get(key, [])
            if not isinstance(value, list) or not all(isinstance(a, str) for a in value):
                raise AlignXError(f'{path}:{number}: "{key}" must be a list of strings')
            answers[key] = tuple(value)
        reference = row.get("reference")
        if reference is not None and not isinstance(reference, str):
            raise AlignXError(f'{path}:{number}: "reference" must be a string')
        try:
            items.append(complete_item(task, JudgeItem(row["prompt"], row["response"], reference=reference, **answers), root))
        except AlignXError as exc:
            raise AlignXError(f"{path}:{number} cannot be scored: {exc}") from None
        rows.append(row)
    if not items:
        raise AlignXError(f"{path} holds no lines to score")
    return rows, items


def _score(args: argparse.Namespace) -> int:
    from alignx.eval.judges import check_task, load_judge, verdicts
    from alignx.eval.judges.data import data_dir
    from alignx.run import atomic_write_text

    task = check_task(args.task)
    settings = _settings(args)
    rows, items = read_items(Path(args.input), task, data_dir(settings))
    judge = load_judge(args.judge, task, settings)
    scores = judge.score(items)
    labels = verdicts(scores)
    lines = [json.dumps({**row, "judge": judge.spec, "task": task, "score": float(s), "label": bool(label)}, ensure_ascii=False)
             for row, s, label in zip(rows, scores, labels)]
    atomic_write_text(Path(args.output), "".join(line + "\n" for line in lines))
    positive = int(labels.sum())
    print(f"[judge] {task} by {judge.spec}: {positive}/{len(scores)} labelled positive -> {args.output}", file=sys.stderr)
    return 0
