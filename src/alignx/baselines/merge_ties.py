"""``merge-ties``: the three axis experts merged into one adapter with PEFT's TIES."""

from __future__ import annotations

from pathlib import Path

from peft import PeftModel

from alignx.axes import AXES
from alignx.config import AlignXConfig
from alignx.errors import AlignXError
from alignx.models.loading import load_base_model
from alignx.run import RunDir, atomic_dir
from alignx.stage1.task_vector import adapter_config, lora_factors


def build_merge_ties(run: RunDir, config: AlignXConfig, density: float = 0.2, log=print) -> Path:
    """Write ``experts/merge-ties/adapter``; density is the share of each task vector TIES keeps (20 % as in
    the TIES paper), every expert weighted 1."""

    if not 0 < density <= 1:
        raise AlignXError(f"TIES density must be in (0, 1], got {density}")
    missing = [axis for axis in AXES if not run.has_adapter(axis)]
    if missing:
        raise AlignXError(f"merge-ties needs the {', '.join(missing)} expert(s): run `alignx stage1 --run {run.root}` first")
    # r₁ + r₂ + r₃ keeps the merged delta's rank, capped by the smallest targeted layer (an SVD of a
    # [out, in] delta has at most min(out, in) directions)
    smallest = min(min(f.A.shape[1], f.B.shape[0]) for f in lora_factors(run.adapter_dir(AXES[0])).values())
    rank = min(sum(adapter_config(run.adapter_dir(axis))["r"] for axis in AXES), smallest)
    model = PeftModel.from_pretrained(load_base_model(config.model).model, run.adapter_dir(AXES[0]), adapter_name=AXES[0])
    for axis in AXES[1:]:
        model.load_adapter(run.adapter_dir(axis), adapter_name=axis)
    model.add_weighted_adapter(
        adapters=list(AXES), weights=[1.0] * len(AXES), adapter_name="merge-ties",
        combination_type="ties_svd", density=density, svd_rank=rank,
    )
    model.set_adapter("merge-ties")
    target = run.adapter_dir("merge-ties")
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp, selected_adapters=["merge-ties"], safe_serialization=True)
        # PEFT saves a non-default adapter in a sub-folder named after it; keep the plain adapter layout
        nested = Path(tmp) / "merge-ties"
        if nested.is_dir():
            for item in nested.iterdir():
                item.rename(Path(tmp) / item.name)
            nested.rmdir()
    log(f"[baseline] merge-ties (density {density}, rank {rank}) -> {target}")
    return target
