"""The Stage 1 recipe: for each axis, train its expert and build its task-feature bank, resumably.

Finished work is recognised by its artifacts (an expert's adapter directory with its summary, the feature
file) and skipped on a rerun, so an interrupted ``alignx stage1`` picks up where it stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import platform
from dataclasses import asdict
from pathlib import Path

import accelerate
import datasets
import peft
import torch
import transformers
import trl
from accelerate import PartialState

from alignx import __version__
from alignx.config import AlignXConfig, load_config
from alignx.data.formatting import ChatFormatter
from alignx.data.splits import preference_pairs, training_examples
from alignx.errors import AlignXError
from alignx.models.loading import load_base_model
from alignx.models.precision import autocast_dtype
from alignx.models.source import resolve_model_source
from alignx.run import RunDir, atomic_save_safetensors, load_safetensors, read_json
from alignx.stage1.features import feature_settings, prompt_features
from alignx.stage1.preference import train_preference_expert
from alignx.stage1.train import ExpertTrainer, encode_examples

# Settings that change what Stage 1 produces: a run may only be resumed or extended with the same ones.
_ARTIFACT_SECTIONS = ("model", "data", "lora", "train", "features", "injections")


def run_stage1(config: AlignXConfig, *, resume: bool = False, log=print) -> RunDir:
    """Train the experts of ``config.axes`` and build their feature banks in ``config.run_dir``."""
    # Everything a user can get wrong (data files, the model) is checked before the run directory is touched.
    splits = {axis: training_examples(axis, config.data) for axis in config.axes}
    base = _load_base(config)
    base_sha256, num_layers = base.weights_sha256, base.num_layers
    del base
    run = RunDir(config.run_dir)
    state = _process_state()
    if not state.is_main_process:
        log = _quiet
    with run.lock() if state.is_main_process else contextlib.nullcontext():
        if state.is_main_process:
            _check_same_config(run, config)
            run.save_config(config)
            _write_manifest_header(run, config)
            run.update_manifest(base_model={"weights_sha256": base_sha256})
        state.wait_for_everyone()
        for axis, split in splits.items():
            if state.is_main_process:
                run.update_manifest(splits={axis: {"rows": len(split.examples), "sha256": split.sha256, "skipped": dict(split.skipped)}})
            if run.has_trained_expert(axis):
                log(f"[stage1] {axis}: expert already trained in {run.adapter_dir(axis)}; skipping")
                entry = run.read_manifest().get("experts", {}).get(axis, {})
                if state.is_main_process and "steps" not in entry:  # stopped after the expert, before its entry
                    run.update_manifest(experts={axis: {**read_json(run.summary_path(axis)), **entry}})
            elif config.train.objective.get(axis, "sft") == "dpo":
                loaded = _load_base(config)
                summary = train_preference_expert(config, run, axis, loaded, preference_pairs(axis, config.data),
                                                  resume=resume, log=log)
                if state.is_main_process:
                    run.update_manifest(experts={axis: asdict(summary)})
            else:
                loaded = _load_base(config)
                encoded, skipped = encode_examples(
                    _formatter(loaded.tokenizer), split.examples, config.injections[axis], config.train.max_length
                )
                if not encoded:
                    raise AlignXError(
                        f"axis {axis}: all {len(split.examples)} rows leave no response token within "
                        f"train.max_length={config.train.max_length} once formatted; raise train.max_length"
                    )
                log(f"[stage1] {axis}: training on {len(encoded)} rows ({sum(skipped.values())} skipped: {dict(skipped)})")
                if state.is_main_process:  # before training, so a rerun that finds the expert can complete its entry
                    run.update_manifest(experts={axis: {"encoding_skipped": dict(skipped)}})
                trainer = ExpertTrainer(config, run, axis, loaded.model, loaded.tokenizer, encoded)
                summary = trainer.train(resume=resume)
                if state.is_main_process:
                    run.update_manifest(experts={axis: {**asdict(summary), "encoding_skipped": dict(skipped)}})
                log(
                    f"[stage1] {axis}: {summary.steps} steps, final loss {summary.final_loss:.4f}, "
                    f"{summary.tokens_per_second:.0f} tokens/s -> {run.adapter_dir(axis)}"
                )
            if state.is_main_process:  # one process builds the bank; the others wait for it
                build_feature_bank(run, config, axis, bank_prompts(split.examples), split.sha256,
                                   base_sha256=base_sha256, num_layers=num_layers, log=log)
            state.wait_for_everyone()
    log(f"[stage1] done: artifacts in {run.root} (manifest: {run.manifest_path})")
    return run


def bank_prompts(examples) -> list[str]:
    """The prompts of a feature bank, in bank row order: each distinct user text once, first occurrence first."""
    return list(dict.fromkeys(e.user_text for e in examples))


def build_feature_bank(run: RunDir, config: AlignXConfig, axis: str, prompts: list[str], split_sha256: str, *,
                       base_sha256: str, num_layers: int, log=print) -> Path:
    """Write ``features/<axis>.safetensors``: router and calibrator features of each prompt (distinct, in order).

    An existing bank is kept while its split and its :func:`feature_settings` (base weights, layers, prompt
    truncation, precision) are the ones this config asks for; otherwise it is rebuilt."""
    path = run.features_path(axis)
    layers = config.features.layers(num_layers)
    dtype = autocast_dtype(config.model, "cpu")  # features are computed where the base model loads: the CPU
    settings = feature_settings(base_sha256, layers, config.features.max_length, dtype)
    if path.is_file():
        _, metadata = load_safetensors(path)
        if metadata.get("split_sha256") == split_sha256 and all(metadata.get(k) == v for k, v in settings.items()):
            log(f"[stage1] {axis}: feature bank already built in {path}; skipping")
            return path
    distinct = list(dict.fromkeys(prompts))
    loaded = _load_base(config)
    loaded.model.eval()
    features = prompt_features(
        loaded.model,
        _formatter(loaded.tokenizer),
        distinct,
        layers,
        batch_size=config.features.batch_size,
        max_length=config.features.max_length,
        autocast_dtype=dtype,
        progress=f"features {axis}",
    )
    metadata = {"axis": axis, "num_prompts": str(len(distinct)), "split_sha256": split_sha256, **settings}
    atomic_save_safetensors({"router": features[layers[0]], "calibrator": features[layers[1]]}, path, metadata)
    log(f"[stage1] {axis}: feature bank of {len(distinct)} prompts (layers {layers[0]}, {layers[1]}) -> {path}")
    return path


def _quiet(*_args) -> None:
    pass


def _process_state():
    """This process's place under ``accelerate launch`` (a single process otherwise)."""
    return PartialState()


def _load_base(config: AlignXConfig):
    return load_base_model(config.model, for_training=True)


def _formatter(tokenizer):
    return ChatFormatter(tokenizer)


def _check_same_config(run: RunDir, config: AlignXConfig) -> None:
    """Refuse to mix artifacts made under different settings in one run directory."""
    made = [p for p in (run.root / "experts", run.root / "features") if p.is_dir() and any(p.iterdir())]
    if not run.config_path.is_file() or not made:
        return

    previous = load_config(run.config_path).to_dict()
    current = config.to_dict()
    changed = []
    for section in _ARTIFACT_SECTIONS:
        before, after = previous[section], current[section]
        changed += [f"{section}.{key}" for key in after if before.get(key) != after.get(key)]
    if changed:
        raise AlignXError(
            f"{run.root} was made with different settings ({', '.join(changed)}); "
            "use the same config to resume, or a new --run directory"
        )


def _write_manifest_header(run: RunDir, config: AlignXConfig) -> None:
    source = resolve_model_source(config.model.name)
    run.update_manifest(
        alignx_version=__version__,
        base_model={"name": config.model.name, "source": dataclasses.asdict(source) if dataclasses.is_dataclass(source) else str(source)},
        config=config.to_dict(),
        libraries={
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "trl": trl.__version__,
            "accelerate": accelerate.__version__,
            "datasets": datasets.__version__,
        },
    )
