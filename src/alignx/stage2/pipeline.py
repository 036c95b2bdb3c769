"""The Stage 2 recipe: train MoCaE (and the uncalibrated router it is measured against) on the feature banks.

Layout under ``<run>/stage2/``::

    eval_features.safetensors    router/calibrator features of the held-out evaluation prompts (cached)
    <name>/mocae.safetensors     router, calibrators, feature space and T_out (``alignx`` by default)
    <name>/mocae.json            axes, layers, truncation, the Stage 2 config it was trained with and what it
                                 was fitted from (bank file hashes, evaluation prompts): a rerun refits on change
    <name>/history.json          per-epoch training loss and calibration NLL
    moe-uncalibrated/...         the same router trained alone: no calibrators, no T_out (mixed as ``alignx``)
    report.json                  routing metrics before/after output calibration, for each router
    reliability.png              reliability diagrams

Each bank is split by a stable hash of the prompt: ``calibration_fraction`` of it is held out for early
stopping and T_out, and is never part of the fractal calibrator's clouds (its points would otherwise be
scored against themselves). Routing is evaluated on the axes' *evaluation* prompts (AlpacaEval,
BeaverTails eval half, TruthfulQA 409–817), which neither Stage 1 nor Stage 2 ever saw.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import torch

from alignx.axes import AXES
from alignx.config import AlignXConfig, Stage2Config
from alignx.data.formatting import ChatFormatter
from alignx.data.splits import evaluation_prompts, in_hash_fraction, training_examples
from alignx.errors import AlignXError
from alignx.eval.metrics import reliability_bins, routing_metrics
from alignx.models.loading import load_base_model
from alignx.models.precision import autocast_dtype
from alignx.run import RunDir, atomic_save_safetensors, atomic_write_json, file_sha256, load_safetensors, read_json
from alignx.stage1.features import feature_settings, prompt_features
from alignx.stage1.pipeline import bank_prompts
from alignx.stage2.crossfit import bank_folds, nested_calibration_scores, out_of_fold_parts
from alignx.stage2.mocae import MoCaE, RoutingData
from alignx.stage2.train import BankRows, build_model, fit_head, train_mocae

BASELINE = "moe-uncalibrated"
PAPER = "paper"  # the paper's combination, kept as a named ablation beside whatever the default is


def paper_variant(stage2: Stage2Config) -> Stage2Config:
    """``stage2`` with the paper's combination: log p + log(0.6·q^frac + 0.4·q^nat), the router trained through
    it, then T_out; no local-dimension term, no adaptive temperature; the experts mixed with the calibrated
    probabilities themselves (soft), every axis its own expert."""
    return dataclasses.replace(stage2, name=PAPER, use_fractal=True, use_natural=True, combination="mixture",
                               output_calibration=True, output_head="temperature", adaptive_temperature=False,
                               lambda_fractal=0.6, lambda_natural=0.4, dimension_weight=0.0, mixing="soft", base_axes=[])


def stage2_dir(run: RunDir) -> Path:
    return run.root / "stage2"


@dataclass(frozen=True)
class Banks:
    """The feature banks of all axes, checked against the data split they were built from.

    ``rows[axis]`` = (router features, calibrator features, prompts, the split's examples); ``settings`` the
    :func:`~alignx.stage1.features.feature_settings` every bank was built with (one set for all);
    ``fingerprint`` identifies the exact bank files, so routers are refitted whenever a bank changes.
    """

    rows: dict
    settings: dict[str, str]
    fingerprint: dict[str, str]

    @property
    def layers(self) -> tuple[int, int]:
        return int(self.settings["router_layer"]), int(self.settings["calibrator_layer"])

    @property
    def max_length(self) -> int:
        return int(self.settings["max_length"])


def load_banks(run: RunDir, config: AlignXConfig) -> Banks:
    rows, settings, fingerprint = {}, None, {}
    base_sha256 = run.read_manifest().get("base_model", {}).get("weights_sha256")
    for axis in AXES:
        path = run.features_path(axis)
        if not path.is_file():
            raise AlignXError(f"no feature bank for axis {axis} in {run.root}; run `alignx stage1 --run {run.root}` first")
        tensors, meta = load_safetensors(path)
        split = training_examples(axis, config.data)
        if base_sha256 and meta.get("base_weights_sha256") != base_sha256:
            raise AlignXError(f"{path} was built from another base model than this run's; rerun `alignx stage1` for this run")
        if meta.get("split_sha256") != split.sha256:
            raise AlignXError(f"{path} was built from a different {axis} data split; rerun `alignx stage1` for this run")
        prompts = bank_prompts(split.examples)
        if len(prompts) != len(tensors["router"]):
            raise AlignXError(f"{path} holds {len(tensors['router'])} rows for {len(prompts)} prompts; it is damaged")
        these = _bank_settings(meta, config)
        if settings is not None and these != settings:
            raise AlignXError(f"the feature banks of {run.root} were built with different settings ({settings} vs {these}); "
                              "rerun `alignx stage1` for this run")
        settings = these
        rows[axis] = (tensors["router"], tensors["calibrator"], prompts, split.examples)
        fingerprint[axis] = file_sha256(path)
    return Banks(rows, settings, fingerprint)


def _bank_settings(meta: dict[str, str], config: AlignXConfig) -> dict[str, str]:
    """A bank's feature settings; banks written before they recorded truncation and precision were built
    with this run's ``features.max_length`` and precision, as Stage 1 wrote them."""
    layers = (int(meta["router_layer"]), int(meta["calibrator_layer"]))
    settings = feature_settings(meta.get("base_weights_sha256", ""), layers,
                                int(meta.get("max_length", config.features.max_length)), autocast_dtype(config.model, "cpu"))
    return {**settings, "precision": meta.get("precision", settings["precision"])}


def evaluation_prompts_of(config: AlignXConfig) -> tuple[list[str], list[int]]:
    """Every axis's distinct held-out evaluation prompts (AlpacaEval, BeaverTails eval half, TruthfulQA
    409–817) and their gold axes, in axis order."""
    prompts, labels = [], []
    for a, axis in enumerate(AXES):
        split = evaluation_prompts(axis, config.data, limit=config.stage2.eval_prompts_per_axis)
        distinct = list(dict.fromkeys(e.user_text for e in split.examples))
        prompts += distinct
        labels += [a] * len(distinct)
    return prompts, labels


def prompts_sha256(prompts: list[str]) -> str:
    return hashlib.sha256("\n\x00".join(prompts).encode()).hexdigest()


def evaluation_features(run: RunDir, config: AlignXConfig, banks: Banks, prompts: list[str], labels: list[int], log=print):
    """Features of the evaluation prompts (:func:`evaluation_prompts_of`) and their gold axes (see
    :func:`prompt_set_features`), cached in ``<run>/stage2/eval_features.safetensors``."""
    router, calibrator = prompt_set_features(config, banks, prompts, stage2_dir(run) / "eval_features.safetensors",
                                             "stage2 eval features", log)
    return router, calibrator, torch.tensor(labels)


def prompt_set_features(config: AlignXConfig, banks: Banks, prompts: list[str], path: Path, progress: str, log=print):
    """Router and calibrator features of ``prompts``, computed exactly as the banks' (same base weights, layers,
    truncation and precision) by one partial prefill, and cached at ``path`` under those settings."""
    key = {"prompts_sha256": prompts_sha256(prompts), **banks.settings}
    if path.is_file():
        tensors, meta = load_safetensors(path)
        if all(meta.get(k) == v for k, v in key.items()):
            return tensors["router"], tensors["calibrator"]
    loaded = load_base_model(config.model)
    layers = banks.layers
    precision = banks.settings["precision"]
    features = prompt_features(
        loaded.model, ChatFormatter(loaded.tokenizer), prompts, layers,
        batch_size=config.features.batch_size, max_length=banks.max_length,
        autocast_dtype=None if precision == "float32" else getattr(torch, precision),  # as the banks were computed
        progress=progress,
    )
    tensors = {"router": features[layers[0]], "calibrator": features[layers[1]]}
    atomic_save_safetensors(tensors, path, key)
    log(f"[stage2] features of {len(prompts)} prompts -> {path}")
    return tensors["router"], tensors["calibrator"]


def _already_done(out: Path, variants: list[Stage2Config], fitted_from: dict) -> bool:
    """True when report.json covers every variant and each was fitted with the same settings from the same
    banks and evaluated on the same prompts (``fitted_from``)."""
    if not (out / "report.json").is_file():
        return False
    if any(v.name == "alignx" for v in variants) and not (out / "trinityx.json").is_file():
        return False
    report = read_json(out / "report.json")
    for variant in variants:
        meta = out / variant.name / "mocae.json"
        if variant.name not in report.get("routers", {}) or not meta.is_file():
            return False
        saved = read_json(meta)
        if saved.get("stage2") != dataclasses.asdict(variant) or saved.get("fitted_from") != fitted_from:
            return False
    return True


def stack_banks(banks: Banks, config: AlignXConfig) -> BankRows:
    router_rows, calibrator_rows, label_rows, held_out, fold_rows = [], [], [], [], []
    for a, axis in enumerate(AXES):
        router, calibrator, prompts, examples = banks.rows[axis]
        held_out.append(torch.tensor([in_hash_fraction(p, config.stage2.calibration_fraction) for p in prompts]))
        router_rows.append(router)
        calibrator_rows.append(calibrator)
        label_rows.append(torch.full((len(prompts),), a))
        fold_rows.append(bank_folds(axis, examples, prompts, router, config.data, config.stage2.seed))
    rows = BankRows(torch.cat(router_rows), torch.cat(calibrator_rows), torch.cat(label_rows), torch.cat(held_out),
                    torch.cat(fold_rows))
    for a, axis in enumerate(AXES):
        fit_count = int(((rows.labels == a) & ~rows.calibration).sum())
        if fit_count < 8 or int(((rows.labels == a) & rows.calibration).sum()) < 1:
            raise AlignXError(
                f"axis {axis}: its feature bank is too small to split for Stage 2 ({fit_count} training prompts); "
                "use more rows (data.max_rows_per_axis) in Stage 1"
            )
    return rows


def run_stage2(config: AlignXConfig, *, force: bool = False, log=print) -> Path:
    """Train ``config.stage2`` (and the uncalibrated baseline and the paper's combination), evaluate routing,
    write the report.

    A run whose report already covers the same routers, fitted with the same settings from the same bank
    files and evaluated on the same prompts, is left as it is unless ``force``.
    """
    run = RunDir(config.run_dir)
    variants = [config.stage2]
    if config.stage2.name != BASELINE:
        variants.append(dataclasses.replace(
            config.stage2, name=BASELINE, use_fractal=False, use_natural=False, output_calibration=False
        ))
    paper = paper_variant(config.stage2)
    if config.stage2.name not in (BASELINE, PAPER) and dataclasses.replace(paper, name=config.stage2.name) != config.stage2:
        variants.append(paper)
    with run.lock():
        out = stage2_dir(run)
        banks = load_banks(run, config)
        eval_prompts, eval_labels = evaluation_prompts_of(config)
        fitted_from = {"banks_sha256": banks.fingerprint, "evaluation_prompts_sha256": prompts_sha256(eval_prompts)}
        if not force and _already_done(out, variants, fitted_from):
            log(f"[stage2] routers already trained with these settings from these banks in {out}; skipping (--force to retrain)")
            return out
        rows = stack_banks(banks, config)
        eval_router, eval_calibrator, eval_labels = evaluation_features(run, config, banks, eval_prompts, eval_labels, log)

        report = {"axes": list(AXES), "layers": list(banks.layers), "routers": {}}
        if (out / "report.json").is_file():  # keep the routers of earlier runs (other ablations) from the same banks
            for name, result in read_json(out / "report.json").get("routers", {}).items():
                meta = out / name / "mocae.json"
                if meta.is_file() and read_json(meta).get("fitted_from") == fitted_from:
                    report["routers"][name] = result
        fit = ~rows.calibration
        for variant in variants:
            model, train_data = build_model(variant, rows.router[fit], rows.calibrator[fit], rows.labels[fit],
                                            banks.layers, banks.max_length)
            calibration = rows.data(model, rows.calibration)
            history = train_mocae(model, train_data, calibration, variant, log=log)
            calibrated = _calibrate_output(model, variant, rows, log) if variant.output_calibration else None
            target = out / variant.name
            target.mkdir(parents=True, exist_ok=True)
            model.save(target, fitted_from)
            atomic_write_json(target / "history.json", history)
            report["routers"][variant.name] = {
                **_evaluate(model, eval_router, eval_calibrator, eval_labels, routing_metrics),
                "output_calibration": calibrated,
            }
            log(_summary_line(variant.name, report["routers"][variant.name]))
            if variant.name == "alignx":
                _write_trinityx(model, calibration, out / "trinityx.json", log)
        atomic_write_json(out / "report.json", report)
        plot_reliability({name: (r["reliability"], r["after_output_calibration"]) for name, r in report["routers"].items()},
                         out / "reliability.png")
        log(f"[stage2] done: routers in {out}, report {out / 'report.json'}, diagrams {out / 'reliability.png'}")
    return out


def _calibrate_output(model: MoCaE, variant: Stage2Config, rows: BankRows, log) -> dict:
    """Fit the output head: on out-of-fold predictions over source groups (``cross-fit``), on the hash split, or
    by whichever of the two nested source-group folds prefer (``auto``). Returns what was done, for the report."""
    method, selection = variant.calibration, None
    if method == "auto":
        selection = nested_calibration_scores(variant, rows, model.layers, model.max_length, log)
        method = "cross-fit" if selection is None else min(selection, key=lambda name: selection[name]["nll"])
    parts = None
    if method == "cross-fit":
        parts = out_of_fold_parts(variant, rows, model.layers, model.max_length, log)
        if parts is None:
            log(f"[stage2] {variant.name}: banks too small for source-group cross-fitting; the head from the hash split")
            method = "hash"
        target = rows.labels[~rows.calibration]
    if parts is None:
        calibration = rows.data(model, rows.calibration)
        with torch.no_grad():
            parts = model.parts(calibration)
        target = calibration.labels
    head = fit_head(model, parts, target)
    log(f"[stage2] {variant.name}: output head {head} ({method})")
    return {"method": method, "head": head, **({"nested_selection": selection} if variant.calibration == "auto" else {})}


def _write_trinityx(model: MoCaE, calibration: RoutingData, path: Path, log) -> None:
    """TrinityX baseline: one global weight vector for every prompt, the mean of MoCaE's calibrated
    weights over the calibration split (held-out prompts of all axes, in their natural proportions)."""
    with torch.no_grad():
        weights = model(calibration).exp().mean(0)
    atomic_write_json(path, {"weights": {axis: round(float(w), 6) for axis, w in zip(AXES, weights)},
                             "from": "alignx", "prompts": int(len(calibration.labels))})
    log(f"[stage2] trinityx global weights {dict(zip(AXES, [round(float(w), 3) for w in weights]))} -> {path}")


def _evaluate(model: MoCaE, router_features, calibrator_features, labels, routing_metrics) -> dict:
    data = model.data_for(router_features, calibrator_features, labels)
    with torch.no_grad():
        raw = model(data, calibrated=False).exp()
        final = model(data, calibrated=True).exp()
    result = {
        "before_output_calibration": routing_metrics(raw, labels, list(AXES)),
        "after_output_calibration": routing_metrics(final, labels, list(AXES)),
        "output_temperature": model.head.temperature if model.config.output_calibration else None,
        "reliability": reliability_bins(final, labels),
    }
    if model.fractal is not None:
        routing = model.route(router_features, calibrator_features)
        result["ood_rate"] = float(routing.ood.float().mean())
    return result


def _summary_line(name: str, result: dict) -> str:
    before, after = result["before_output_calibration"], result["after_output_calibration"]
    return (
        f"[stage2] {name}: held-out accuracy {after['accuracy']:.3f}, ECE {before['ece']:.3f} -> {after['ece']:.3f}, "
        f"NLL {before['nll']:.3f} -> {after['nll']:.3f}, Brier {after['brier']:.3f}"
    )


def plot_reliability(panels: dict[str, tuple[list[dict], dict]], path: Path) -> None:
    """One reliability diagram per router: ``panels[name] = (reliability bins, metrics with accuracy and ece)``."""
    matplotlib.use("Agg")

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2), squeeze=False)
    for ax, (name, (bins, metrics)) in zip(axes[0], panels.items()):
        bins = [b for b in bins if b["count"]]
        ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
        ax.bar([b["confidence"] for b in bins], [b["accuracy"] for b in bins], width=1 / 15, alpha=0.7, edgecolor="black")
        ax.set_title(f"{name}\nacc {metrics['accuracy']:.3f}  ECE {metrics['ece']:.3f}")
        ax.set_xlabel("confidence (top routing weight)")
        ax.set_ylabel("accuracy")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
