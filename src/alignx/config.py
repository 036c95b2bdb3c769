"""Configuration: one dataclass per section, loaded from YAML with ``key=value`` CLI overrides.

Every field has the specification's default (METHOD.md), so an empty YAML file is a valid config.
Unknown keys are an error that lists the valid ones: a typo must never be silently ignored.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from alignx.axes import AXES, DEFAULT_INJECTIONS, parse_axes
from alignx.errors import AlignXError


def cache_dir() -> Path:
    """AlignX's user cache: $ALIGNX_CACHE_DIR, else $XDG_CACHE_HOME/alignx, else ~/.cache/alignx."""
    if os.environ.get("ALIGNX_CACHE_DIR"):
        return Path(os.environ["ALIGNX_CACHE_DIR"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "alignx"
    return Path.home() / ".cache" / "alignx"


@dataclass
class ModelConfig:
    """Which base model to align and how to run it."""

    name: str = "smollm2-135m"  # hub id, local directory, GGUF file, or the embedded default
    precision: str = "auto"  # auto (bf16 where the device supports it) | bf16 | fp32
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        _check_choice("model.precision", self.precision, ("auto", "bf16", "fp32"))


@dataclass
class DataConfig:
    """Where the data sets are read from and how much of each axis to use."""

    data_dir: str | None = None  # local copy laid out like shared/data; None -> $ALIGNX_DATA_DIR, then the hub
    helpful_rows: int = 20_000  # Alpaca rows sampled for the helpful axis [paper: 20k]
    max_rows_per_axis: int | None = None  # cap for quick runs and tests; None uses every row
    seed: int = 0

    def __post_init__(self) -> None:
        _check_positive("data.helpful_rows", self.helpful_rows)
        if self.max_rows_per_axis is not None:
            _check_positive("data.max_rows_per_axis", self.max_rows_per_axis)

    def resolved_data_dir(self) -> Path | None:
        """The local data directory, or None to read from the Hugging Face hub."""
        value = self.data_dir or os.environ.get("ALIGNX_DATA_DIR")
        return Path(value).expanduser() if value else None


@dataclass
class LoraConfig:
    """One LoRA expert per axis. Default r=16, alpha=32 on every attention and MLP projection."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    targets: str = "attention-mlp"  # attention-mlp | attention | qv | comma-separated module names

    def __post_init__(self) -> None:
        _check_positive("lora.r", self.r)
        _check_positive("lora.alpha", self.alpha)
        if not 0.0 <= self.dropout < 1.0:
            raise AlignXError(f"lora.dropout must be in [0, 1), got {self.dropout}")


@dataclass
class TrainConfig:
    """Stage 1 optimisation: AdamW + cosine schedule, weight decay 0.01 and 3 epochs [paper]."""

    epochs: float = 3.0
    max_steps: int | None = None  # optimizer steps per axis; overrides epochs when set
    batch_size: int = 8  # per device
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.01
    warmup_ratio: float = 0.03
    max_grad_norm: float = 1.0
    max_length: int = 512  # tokens per example; longer examples are truncated (response end first)
    group_by_length: bool = True  # batches of similar length: far less padding
    packing: bool = False  # several examples per row, attention kept within each example
    seed: int = 0
    save_every: int = 50  # optimizer steps between checkpoints
    keep_checkpoints: int = 2
    max_loss: float = 1e4  # a loss above this (or NaN) stops training; the last good checkpoint stays
    objective: dict[str, str] = field(default_factory=dict)  # axis -> sft (default) | dpo: DPO through TRL on the
    # axis's preference pairs (alignx.data.splits.preference_pairs), the base with adapters disabled as reference
    dpo_beta: float = 0.1  # DPO's beta (the strength of the pull towards the reference)

    def __post_init__(self) -> None:
        for axis, objective in self.objective.items():
            _check_choice("train.objective keys", axis, AXES)
            _check_choice(f"train.objective.{axis}", objective, OBJECTIVES)
            if axis == "helpful" and objective == "dpo":
                raise AlignXError("train.objective.helpful cannot be dpo: no clean helpful preference pairs are staged "
                                  "(AlpacaEval's annotations are the evaluation's prompts; see docs/method.md)")
        if self.dpo_beta <= 0:
            raise AlignXError(f"train.dpo_beta must be > 0, got {self.dpo_beta}")
        for name in ("batch_size", "grad_accum", "max_length", "save_every", "keep_checkpoints"):
            _check_positive(f"train.{name}", getattr(self, name))
        if self.max_steps is not None:
            _check_positive("train.max_steps", self.max_steps)
        if self.epochs <= 0:
            raise AlignXError(f"train.epochs must be > 0, got {self.epochs}")
        if self.lr <= 0:
            raise AlignXError(f"train.lr must be > 0, got {self.lr}")


@dataclass
class FeatureConfig:
    """Task features: mean-pooled hidden states of the frozen base at the router and calibrator layers.

    ``None`` layers resolve to METHOD.md's defaults: router ~L/2, calibrator floor(2L/3).
    """

    router_layer: int | None = None
    calibrator_layer: int | None = None
    batch_size: int = 32
    max_length: int = 256  # prompt tokens; longer prompts keep their first tokens

    def __post_init__(self) -> None:
        _check_positive("features.batch_size", self.batch_size)
        _check_positive("features.max_length", self.max_length)

    def layers(self, num_layers: int) -> tuple[int, int]:
        """(router layer, calibrator layer), 1-based decoder-layer outputs, validated for this model."""
        router = self.router_layer if self.router_layer is not None else max(1, num_layers // 2)
        calibrator = self.calibrator_layer if self.calibrator_layer is not None else max(1, (2 * num_layers) // 3)
        for name, layer in (("features.router_layer", router), ("features.calibrator_layer", calibrator)):
            if not 1 <= layer <= num_layers:
                raise AlignXError(f"{name}={layer} is outside this model's decoder layers 1..{num_layers}")
        return router, calibrator


@dataclass
class Stage2Config:
    """MoCaE: router + fractal and natural calibrators + output calibration (METHOD.md section 3).

    [paper] values are the paper's; the rest are this project's choices, each switchable for ablations.
    """

    name: str = "alignx"  # artifacts go to <run>/stage2/<name>/; use another name for an ablation
    latent_dim: int = 256  # k of the calibrator's PCA latent [paper]; not whitened
    router_hidden: int = 1024  # phi: R^d -> R^1024, W_r in R^{3x1024} [paper]
    router_phi: str = "linear"  # linear (starts at the L2-regularised logistic solution) | gelu
    router_init_c: float = 0.01  # inverse L2 strength of that logistic-regression initialisation
    router_temperature: float = 1.0  # T [paper]
    use_fractal: bool = True
    use_natural: bool = True
    combination: str = "mixture"  # mixture [paper]: log p + log(l1 q_frac + l2 q_nat), router trained through it |
    # pooled: router alone, then a log p + b log q_frac + c log q_nat with the exponents fitted like T_out (stage2/heads.py)
    output_calibration: bool = True  # fit the output head by NLL (see calibration)
    output_head: str = "temperature"  # temperature (T_out) | vector | dirichlet (Kull et al. 2019)
    head_class_balanced: bool = True  # fit the head with each axis weighted alike (the banks are ~78 % helpful)
    adaptive_temperature: bool = False  # a per-prompt temperature from the calibrators' signals (log u_max, and
    # log q_frac, log q_nat of the top axis), fitted like T_out; it never changes the top axis (stage2/heads.py)
    calibration: str = "cross-fit"  # cross-fit: T_out on out-of-fold predictions over source groups | hash |
    # auto: whichever has the lower NLL on nested source-group folds (never the evaluation prompts; see stage2/crossfit.py)
    lambda_fractal: float = 0.6  # [paper]
    lambda_natural: float = 0.4  # [paper]
    epsilon: float = 0.05  # granularity of the soft correlation integral [paper]
    epsilon_mode: str = "fixed"  # fixed | dimension (eps_a = clip(1/D_a, 0.03, 0.10))
    neighbour_fraction: float = 0.01  # k_a = max(min_neighbours, ceil(fraction * N_a)) for the radius r_a
    min_neighbours: int = 3
    dimension_neighbours: int = 20  # m of the Levina-Bickel local dimension
    dimension_weight: float = 1.0  # weight beta of the local-dimension term (0 = off); on because nested source-group
    # folds of the full banks chose it over every other design (benchmarks/routing_quality.py, docs/method.md)
    bank_dtype: str = "float32"  # float32 | float16: storage of the fractal banks (queries compute in float32).
    # float16 halves them (~29 MB less for 3 x 20k x 256) for ~6 ms more per routed batch; kept only where it
    # moves log C by <= 0.01 (see stage2/fractal.py)
    mixing: str = "soft"  # how the experts are mixed, from the calibrated probabilities (stage2/mixing_weights.py):
    # soft [paper]: w = p | power: w proportional to p**mixing_power | top1: all weight on the most probable axis
    mixing_power: float = 2.0  # the exponent of mixing: power
    base_axes: list[str] = field(default_factory=lambda: ["helpful"])  # axes whose expert the mixture replaces by
    # the base model (weight zeroed, not renormalised: a prompt routed wholly there runs on the base model). helpful:
    # chosen on training-fold evidence, where SmolLM2's helpful expert loses to the base model by the judges
    # (benchmarks/mixing_selection.py, docs/method.md#mixing-weights); [] when each expert beats its base
    ood_alpha: float = 0.05  # the prompt fits no axis when max typicality < alpha
    ood_fallback: str = "uniform"  # uniform | base (experts off)
    natural_tau_init: float = 0.1
    calibration_fraction: float = 0.1  # of each axis's bank, held out for early stopping and T_out
    batch_size: int = 64  # [paper]
    lr: float = 1e-3
    weight_decay: float = 0.01  # [paper]
    max_epochs: int = 40
    patience: int = 4
    class_balanced: bool = True
    seed: int = 0
    eval_prompts_per_axis: int | None = None  # held-out routing evaluation prompts per axis (None = all)

    def __post_init__(self) -> None:
        _check_choice("stage2.router_phi", self.router_phi, ("linear", "gelu"))
        _check_choice("stage2.epsilon_mode", self.epsilon_mode, ("fixed", "dimension"))
        _check_choice("stage2.ood_fallback", self.ood_fallback, ("uniform", "base"))
        _check_choice("stage2.calibration", self.calibration, ("cross-fit", "hash", "auto"))
        _check_choice("stage2.bank_dtype", self.bank_dtype, ("float16", "float32"))
        _check_choice("stage2.combination", self.combination, ("mixture", "pooled"))
        _check_choice("stage2.output_head", self.output_head, ("temperature", "vector", "dirichlet"))
        _check_choice("stage2.mixing", self.mixing, MIXINGS)
        if not self.mixing_power > 0:
            raise AlignXError(f"stage2.mixing_power must be > 0, got {self.mixing_power}")
        for axis in self.base_axes:
            _check_choice("stage2.base_axes", axis, AXES)
        if self.adaptive_temperature and not (self.use_fractal or self.use_natural):
            raise AlignXError("stage2.adaptive_temperature reads the calibrators: switch one on (stage2.use_fractal or use_natural)")
        for name in ("latent_dim", "router_hidden", "min_neighbours", "dimension_neighbours", "batch_size",
                     "max_epochs", "patience"):
            _check_positive(f"stage2.{name}", getattr(self, name))
        if not 0.0 < self.calibration_fraction < 0.5:
            raise AlignXError(f"stage2.calibration_fraction must be in (0, 0.5), got {self.calibration_fraction}")
        if self.lambda_fractal < 0 or self.lambda_natural < 0:
            raise AlignXError("stage2.lambda_fractal and stage2.lambda_natural must be >= 0")
        if not self.name or "/" in self.name:
            raise AlignXError(f"stage2.name must be a plain folder name, got {self.name!r}")


# How an expert is trained (alignx.stage1 implements them).
OBJECTIVES = ("sft", "dpo")

# How the experts are mixed from the routing probabilities (alignx.stage2.mixing_weights implements them).
MIXINGS = ("soft", "power", "top1")

# The questions a judge answers (alignx.eval.judges implements them); here so configs are checked without
# importing the evaluation.
JUDGE_TASKS = ("safety", "truth", "info", "helpfulness", "refusal")


@dataclass
class EvalConfig:
    """``alignx eval`` (METHOD.md section 5): which prompts, how to generate, which judges."""

    suite: str = "quick"  # quick: a seeded subset of every benchmark | full: the whole evaluation splits
    quick_items: int = 40  # prompts per benchmark in the quick suite
    items: dict[str, int] = field(default_factory=dict)  # per-benchmark override of quick_items (truthfulqa_mc: 409)
    benchmarks: list[str] | None = None  # which benchmarks to run (None: every one; names in alignx.eval.benchmarks)
    max_new_tokens: int = 128
    batch_size: int = 8  # prompts decoded together, at most
    batch_tokens: int = 2048  # and at most this many prompt tokens per batch, padding included (rows x longest)
    do_sample: bool = False  # greedy by default; seeded sampling as an option
    temperature: float = 0.7
    top_p: float = 0.9
    seed: int = 0  # the quick subsets, sampling, and the bootstrap
    bootstrap: int = 1000  # resamples for the 95 % confidence intervals
    axis_collapse: bool = True  # also evaluate each expert-<axis> on its own axis's benchmarks
    reference: str = "alignx"  # every other method is compared with it, paired, on the same items
    judges: dict[str, str] = field(default_factory=dict)  # task -> judge spec; a missing task uses "offline"
    judges_dir: str | None = None  # offline judges (None: <alignx cache>/judges)

    def __post_init__(self) -> None:
        _check_choice("eval.suite", self.suite, ("quick", "full"))
        for name in ("quick_items", "max_new_tokens", "batch_size", "batch_tokens", "bootstrap"):
            _check_positive(f"eval.{name}", getattr(self, name))
        for name, count in self.items.items():
            _check_positive(f"eval.items.{name}", count)
        for task in self.judges:
            if task not in JUDGE_TASKS:
                raise AlignXError(f"eval.judges: unknown judge task {task!r}; valid tasks: {', '.join(JUDGE_TASKS)}")


@dataclass
class AlignXConfig:
    """The whole configuration of a run; sections mirror the YAML files in ``configs/``."""

    run_dir: str = "runs/default"
    axes: list[str] = field(default_factory=lambda: list(AXES))
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    eval: EvalConfig = field(default_factory=EvalConfig)
    injections: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_INJECTIONS))

    def __post_init__(self) -> None:
        self.axes = list(parse_axes(self.axes))
        missing = [a for a in AXES if a not in self.injections]
        unknown = [a for a in self.injections if a not in AXES]
        if unknown:
            raise AlignXError(f"injections: unknown axis {', '.join(unknown)}; valid axes: {', '.join(AXES)}")
        if missing:  # a YAML that sets one axis keeps the defaults of the others
            self.injections = {a: self.injections.get(a, DEFAULT_INJECTIONS[a]) for a in AXES}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> AlignXConfig:
    """Load a YAML config (or the defaults when ``path`` is None) and apply ``section.key=value`` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise AlignXError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise AlignXError(f"config file {path} is not valid YAML: {exc}") from None
        if not isinstance(raw, dict):
            raise AlignXError(f"config file {path} must hold a mapping of sections, got {type(raw).__name__}")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise AlignXError(f"override {item!r} must look like section.key=value")
        _set_dotted(raw, key.strip().split("."), yaml.safe_load(value))
    return from_dict(AlignXConfig, raw, prefix="")


def from_dict(cls: type, raw: dict[str, Any], prefix: str) -> Any:
    """Build dataclass ``cls`` from a plain mapping, checking keys and types with messages that name the field."""
    if not isinstance(raw, dict):
        raise AlignXError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        where = prefix.rstrip(".") or "top level"
        raise AlignXError(
            f"unknown config key {', '.join(prefix + k for k in unknown)} ({where}); valid keys: {', '.join(fields)}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in raw.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = from_dict(hint, value or {}, prefix=f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(f"{prefix}{name}", hint, value)
    return cls(**kwargs)


def _coerce(name: str, hint: Any, value: Any) -> Any:
    """Check ``value`` against a simple type hint, accepting ints for floats and None for optionals."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(name, option, value)
            except AlignXError as exc:
                errors.append(str(exc))
        raise AlignXError(errors[0])
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise AlignXError(f"{name} must be a list, got {value!r}")
        return list(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise AlignXError(f"{name} must be a mapping, got {value!r}")
        key_hint, value_hint = typing.get_args(hint) or (str, str)
        return {_coerce(f"{name}.{k}", key_hint, k): _coerce(f"{name}.{k}", value_hint, v) for k, v in value.items()}
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise AlignXError(f"{name} must be {hint.__name__}, got {value!r}")
    return value


def _set_dotted(raw: dict[str, Any], keys: list[str], value: Any) -> None:
    node = raw
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise AlignXError(f"cannot override {'.'.join(keys)}: {key} is not a section")
        node = child
    node[keys[-1]] = value


def _check_positive(name: str, value: int) -> None:
    if value <= 0:
        raise AlignXError(f"{name} must be > 0, got {value}")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise AlignXError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
