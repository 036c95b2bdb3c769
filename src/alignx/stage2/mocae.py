"""MoCaE: the router's distribution calibrated by geometry (fractal) and semantics (natural).

Two combinations (``stage2.combination``; see :mod:`.heads`):

* ``mixture`` [paper]: c = λ₁·q^frac + λ₂·q^nat (λ₁ = 0.6, λ₂ = 0.4 [paper]), w = softmax((log p + log c) / T_out),
  the router trained through log c;
* ``pooled`` [ours]: the router trained alone, then w = softmax(a·log p + b·log q^frac + c·log q^nat), the
  exponents fitted out of fold like T_out (log-linear pooling).

The output head (T_out, or vector / Dirichlet scaling) is fitted after training on predictions the pipeline
chooses (:mod:`.crossfit`). Then the out-of-distribution gate: a prompt whose max typicality is below α fits
no axis and gets the configured fallback (a uniform mix, or the base model = all-zero expert weights). The
experts are mixed with weights made from the calibrated probabilities (``stage2.mixing``, :mod:`.mixing_weights`);
the probabilities themselves are what the routing is explained and measured by. Each
part can be switched off for ablations; with both calibrators and the head off this is exactly
``moe-uncalibrated`` (w = p).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from alignx.config import FeatureConfig, Stage2Config, from_dict
from alignx.errors import AlignXError
from alignx.run import atomic_save_safetensors, atomic_write_json, load_safetensors, read_json
from alignx.stage2.feature_space import FeatureSpace
from alignx.stage2.fractal import FractalCalibrator
from alignx.stage2.heads import SIGNALS, TERMS, OutputHead, Parts
from alignx.stage2.mixing_weights import mixing_weights
from alignx.stage2.natural import NaturalCalibrator
from alignx.stage2.router import Router


@dataclass
class RoutingData:
    """Standardised router features, the fractal calibrator's typicality u and log q^frac (None without it), and
    gold axes (None at inference)."""

    h: torch.Tensor
    typicality: torch.Tensor | None
    labels: torch.Tensor | None = None

    @property
    def log_fractal(self) -> torch.Tensor | None:
        return None if self.typicality is None else FractalCalibrator.distribution(self.typicality).log()

    def subset(self, index: torch.Tensor) -> "RoutingData":
        return RoutingData(self.h[index], None if self.typicality is None else self.typicality[index],
                           None if self.labels is None else self.labels[index])


@dataclass
class Routing:
    """Every distribution MoCaE computed for a batch of prompts ([Q, A] each; None when switched off)."""

    router: torch.Tensor  # p
    fractal: torch.Tensor | None  # q^frac
    typicality: torch.Tensor | None  # u
    natural: torch.Tensor | None  # q^nat
    calibrated: torch.Tensor  # the calibrated probabilities (what --explain, the routing metrics and the gate read)
    weights: torch.Tensor  # the mixing weights made from them (stage2.mixing), after the gate (all zeros = the base model)
    ood: torch.Tensor  # [Q] bool: flagged by the gate


def base_logits(config: Stage2Config, parts: Parts) -> torch.Tensor:
    """What the head maps: log p + log c (``mixture``), or log p alone (``pooled``: the calibrators are the
    head's own terms). ``parts`` holds only the calibrators that are on."""
    if config.combination == "pooled":
        return parts.router
    log_c = log_calibration(config, parts)
    return parts.router if log_c is None else parts.router + log_c


def log_calibration(config: Stage2Config, parts: Parts) -> torch.Tensor | None:
    """log c = log(λ₁·q^frac + λ₂·q^nat) with λ renormalised over the calibrators that are on."""
    terms = [(weight, log_q) for weight, log_q in ((config.lambda_fractal, parts.fractal),
                                                   (config.lambda_natural, parts.natural)) if log_q is not None]
    if not terms:
        return None
    total = sum(weight for weight, _ in terms)
    if total <= 0:
        raise AlignXError("stage2.lambda_fractal + stage2.lambda_natural must be > 0 for the calibrators that are on")
    stacked = torch.stack([math.log(weight / total) + log_q if weight > 0 else torch.full_like(log_q, -math.inf)
                           for weight, log_q in terms])
    return torch.logsumexp(stacked, dim=0)


def head_for(config: Stage2Config, num_axes: int) -> OutputHead:
    """The (unfitted) output head ``config`` asks for: a pooled head takes each calibrator that is on and whose
    λ is > 0 as a term; an adaptive temperature reads the signals of every calibrator that is on."""
    terms = ()
    if config.combination == "pooled":
        terms = tuple(t for t, on, weight in zip(TERMS, (config.use_fractal, config.use_natural),
                                                 (config.lambda_fractal, config.lambda_natural)) if on and weight > 0)
    signals = ()
    if config.adaptive_temperature:
        on = {"typicality": config.use_fractal, "fractal": config.use_fractal, "natural": config.use_natural}
        signals = tuple(s for s in SIGNALS if on[s])
    return OutputHead(num_axes, config.output_head, terms, signals)


def log_weights(config: Stage2Config, head: OutputHead, parts: Parts, *, calibrated: bool = True) -> torch.Tensor:
    """log w from ``parts`` (restricted to ``config``'s calibrators): the head on the base logits, or without
    ``calibrated`` (or with ``output_calibration`` off) the base logits normalised."""
    parts = parts_for(config, parts)
    base = base_logits(config, parts)
    if calibrated and config.output_calibration:
        return head(base, parts)
    return torch.log_softmax(base, dim=-1)


def parts_for(config: Stage2Config, parts: Parts) -> Parts:
    """``parts`` with the calibrators ``config`` switches off removed (the typicality stays: it gates)."""
    return Parts(parts.router, parts.fractal if config.use_fractal else None,
                 parts.natural if config.use_natural else None, parts.typicality if config.use_fractal else None)


class MoCaE(nn.Module):
    def __init__(
        self,
        config: Stage2Config,
        axes: list[str],
        space: FeatureSpace,
        router: Router,
        natural: NaturalCalibrator | None,
        fractal: FractalCalibrator | None,
        layers: tuple[int, int],
        max_length: int,
    ):
        super().__init__()
        self.config, self.axes, self.space, self.layers = config, list(axes), space, tuple(layers)
        self.max_length = int(max_length)  # prompt tokens the features were pooled over: inference truncates alike
        self.router = router
        self.natural = natural if config.use_natural else None
        self.fractal = fractal if config.use_fractal else None
        self.head = head_for(config, len(self.axes))

    def data_for(self, router_features: torch.Tensor, calibrator_features: torch.Tensor,
                 labels: torch.Tensor | None = None) -> RoutingData:
        """Raw pooled features of fresh prompts (scored against the full clouds) as the model's inputs."""
        u = self.fractal.typicality(self.space.latent(calibrator_features)) if self.fractal is not None else None
        return RoutingData(self.space.router(router_features), u, labels)

    # ---- the combination ----------------------------------------------------------------------------
    def parts(self, data) -> Parts:
        """log p, log q^frac, log q^nat and log u_max of ``data`` (a :class:`~.train.RoutingData`)."""
        return Parts(
            router=self.router.log_probs(data.h),
            fractal=data.log_fractal if self.fractal is not None else None,
            natural=self.natural.log_probs(data.h) if self.natural is not None else None,
            typicality=data.typicality.max(dim=1).values.log() if self.fractal is not None else None,
        )

    def base_logits(self, parts: Parts) -> torch.Tensor:
        return base_logits(self.config, parts)

    def forward(self, data, *, calibrated: bool = True) -> torch.Tensor:
        """log w of ``data`` (standardised router features, log q^frac and log u_max: a RoutingData). Without
        ``calibrated`` it is what the router is trained on: the base logits, normalised, with no head."""
        return log_weights(self.config, self.head, self.parts(data), calibrated=calibrated)

    @torch.no_grad()
    def route(self, router_features: torch.Tensor, calibrator_features: torch.Tensor) -> Routing:
        """Route raw (unstandardised) pooled features of a batch of prompts."""
        data = self.data_for(router_features, calibrator_features)
        u = data.typicality
        parts = self.parts(data)  # each distribution once: the weights and the explanation read the same ones
        calibrated = log_weights(self.config, self.head, parts).exp()
        weights = mixing_weights(calibrated, self.config, self.axes)
        ood = torch.zeros(len(data.h), dtype=torch.bool)
        if u is not None:
            ood = u.max(dim=1).values < self.config.ood_alpha
            fallback = 0.0 if self.config.ood_fallback == "base" else 1.0 / len(self.axes)
            weights = torch.where(ood[:, None], torch.full_like(weights, fallback), weights)  # never writes into p
        return Routing(
            router=parts.router.exp(),
            fractal=parts.fractal.exp() if parts.fractal is not None else None,
            typicality=u,
            natural=parts.natural.exp() if parts.natural is not None else None,
            calibrated=calibrated,
            weights=weights,
            ood=ood,
        )

    # ---- persistence --------------------------------------------------------------------------------
    def save(self, directory: Path, fitted_from: dict | None = None) -> None:
        """Write the router; ``fitted_from`` records what it was fitted from (Stage 2 skips a refit while it matches)."""
        tensors = {**self.space.state(), **{f"head.{k}": v for k, v in self.head.state_dict().items()}}
        tensors.update({f"router.{k}": v for k, v in self.router.state_dict().items()})
        if self.natural is not None:
            tensors.update({f"natural.{k}": v for k, v in self.natural.state_dict().items()})
        if self.fractal is not None:
            tensors.update(self.fractal.state())
        atomic_save_safetensors(tensors, Path(directory) / "mocae.safetensors")
        atomic_write_json(
            Path(directory) / "mocae.json",
            {
                "axes": self.axes,
                "router_layer": self.layers[0],
                "calibrator_layer": self.layers[1],
                "feature_max_length": self.max_length,
                "router_in_dim": self.router.phi.in_features,
                "output_temperature": self.head.temperature if self.config.output_calibration else None,
                "output_head": self.head.describe(),
                "stage2": asdict(self.config),
                **({"fitted_from": fitted_from} if fitted_from is not None else {}),
            },
        )

    @classmethod
    def load(cls, directory: Path) -> "MoCaE":
        directory = Path(directory)
        meta = read_json(directory / "mocae.json")
        tensors, _ = load_safetensors(directory / "mocae.safetensors")
        config = from_dict(Stage2Config, {"mixing": "soft", **meta["stage2"]}, prefix="stage2.")  # older files mixed soft
        axes = meta["axes"]
        router = Router(meta["router_in_dim"], len(axes), config.router_hidden, config.router_phi, config.router_temperature)
        router.load_state_dict({k[len("router."):]: v for k, v in tensors.items() if k.startswith("router.")})
        natural = None
        if config.use_natural:
            natural = NaturalCalibrator(tensors["natural.centroids"])
            natural.load_state_dict({k[len("natural."):]: v for k, v in tensors.items() if k.startswith("natural.")})
        fractal = None
        if config.use_fractal:
            fractal = FractalCalibrator.from_state(
                tensors, len(axes), dimension_neighbours=config.dimension_neighbours, dimension_weight=config.dimension_weight
            )
        model = cls(config, axes, FeatureSpace.from_state(tensors), router, natural, fractal,
                    (meta["router_layer"], meta["calibrator_layer"]),
                    meta.get("feature_max_length", FeatureConfig().max_length))  # older files: the default they used
        if "log_t_out" in tensors:  # files before output heads: a temperature T_out
            model.head.matrix.copy_(torch.eye(len(axes)) / tensors["log_t_out"].exp())
        else:
            model.head.load_state_dict({k[len("head."):]: v for k, v in tensors.items() if k.startswith("head.")})
        return model.eval()
