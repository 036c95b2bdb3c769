"""MoCaE: the router's distribution calibrated by geometry (fractal) and semantics (natural).

c = λ₁·q^frac + λ₂·q^nat (λ₁ = 0.6, λ₂ = 0.4 [paper]), w = softmax((log p + log c) / T_out), where T_out is
fitted on a held-out calibration split by NLL (output calibration). Then the out-of-distribution gate:
a prompt whose max typicality is below α fits no axis and gets the configured fallback (a uniform mix,
or the base model = all-zero expert weights). Each part can be switched off for ablations; with both
calibrators and T_out off this is exactly ``moe-uncalibrated`` (w = p).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from alignx.config import FeatureConfig, Stage2Config
from alignx.errors import AlignXError
from alignx.run import atomic_save_safetensors, atomic_write_json, load_safetensors, read_json
from alignx.stage2.feature_space import FeatureSpace
from alignx.stage2.fractal import FractalCalibrator
from alignx.stage2.natural import NaturalCalibrator
from alignx.stage2.router import Router


@dataclass
class Routing:
    """Every distribution MoCaE computed for a batch of prompts ([Q, A] each; None when switched off)."""

    router: torch.Tensor  # p
    fractal: torch.Tensor | None  # q^frac
    typicality: torch.Tensor | None  # u
    natural: torch.Tensor | None  # q^nat
    calibrated: torch.Tensor  # w before the gate
    weights: torch.Tensor  # w after the gate (all zeros = the base model)
    ood: torch.Tensor  # [Q] bool: flagged by the gate


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
        self.register_buffer("log_t_out", torch.zeros(()))

    # ---- the combination ----------------------------------------------------------------------------
    def log_calibration(self, h: torch.Tensor, log_fractal: torch.Tensor | None) -> torch.Tensor | None:
        """log c = log(λ₁·q^frac + λ₂·q^nat) with λ renormalised over the calibrators that are on."""
        parts = []
        if self.fractal is not None and log_fractal is not None:
            parts.append((self.config.lambda_fractal, log_fractal))
        if self.natural is not None:
            parts.append((self.config.lambda_natural, self.natural.log_probs(h)))
        if not parts:
            return None
        total = sum(weight for weight, _ in parts)
        if total <= 0:
            raise AlignXError("stage2.lambda_fractal + stage2.lambda_natural must be > 0 for the calibrators that are on")
        stacked = torch.stack([math.log(weight / total) + log_q if weight > 0 else torch.full_like(log_q, -math.inf)
                               for weight, log_q in parts])
        return torch.logsumexp(stacked, dim=0)

    def forward(self, h: torch.Tensor, log_fractal: torch.Tensor | None, *, calibrated: bool = True) -> torch.Tensor:
        """log w for standardised router features ``h`` and precomputed log q^frac."""
        logits = self.router.log_probs(h)
        log_c = self.log_calibration(h, log_fractal)
        if log_c is not None:
            logits = logits + log_c
        temperature = self.log_t_out.exp() if (calibrated and self.config.output_calibration) else 1.0
        return torch.log_softmax(logits / temperature, dim=-1)

    @torch.no_grad()
    def route(self, router_features: torch.Tensor, calibrator_features: torch.Tensor) -> Routing:
        """Route raw (unstandardised) pooled features of a batch of prompts."""
        h = self.space.router(router_features)
        u = self.fractal.typicality(self.space.latent(calibrator_features)) if self.fractal is not None else None
        q_frac = FractalCalibrator.distribution(u) if u is not None else None
        log_w = self.forward(h, q_frac.log() if q_frac is not None else None)
        calibrated = log_w.exp()
        weights = calibrated.clone()
        ood = torch.zeros(len(h), dtype=torch.bool)
        if u is not None:
            ood = u.max(dim=1).values < self.config.ood_alpha
            fallback = 0.0 if self.config.ood_fallback == "base" else 1.0 / len(self.axes)
            weights[ood] = fallback
        return Routing(
            router=self.router.log_probs(h).exp(),
            fractal=q_frac,
            typicality=u,
            natural=self.natural.log_probs(h).exp() if self.natural is not None else None,
            calibrated=calibrated,
            weights=weights,
            ood=ood,
        )

    # ---- persistence --------------------------------------------------------------------------------
    def save(self, directory: Path, fitted_from: dict | None = None) -> None:
        """Write the router; ``fitted_from`` records what it was fitted from (Stage 2 skips a refit while it matches)."""
        tensors = {**self.space.state(), "log_t_out": self.log_t_out}
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
                "output_temperature": float(self.log_t_out.exp()),
                "stage2": asdict(self.config),
                **({"fitted_from": fitted_from} if fitted_from is not None else {}),
            },
        )

    @classmethod
    def load(cls, directory: Path) -> "MoCaE":
        from alignx.config import from_dict

        directory = Path(directory)
        meta = read_json(directory / "mocae.json")
        tensors, _ = load_safetensors(directory / "mocae.safetensors")
        config = from_dict(Stage2Config, meta["stage2"], prefix="stage2.")
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
        model.log_t_out.copy_(tensors["log_t_out"])
        return model.eval()
