"""Output heads: the last map from what MoCaE computed for a prompt to its routing weights, fitted after training.

What MoCaE computes for a prompt (:class:`Parts`): the router's log p, the calibrators' log q^frac and log q^nat
(None when off) and log u_max, the log of the prompt's highest typicality. ``stage2.combination`` says how
they meet before the head:

* ``mixture`` [paper]: base = log p + log(λ₁·q^frac + λ₂·q^nat); the router is trained through it;
* ``pooled`` [ours]: base = log p, the router trained alone, and each calibrator enters the head as its own
  log-linear term with a fitted exponent (a product of experts: log w = a·log p + b·log q^frac + c·log q^nat).
  A calibrator whose λ is 0 stays out of the head (the fractal one still gates).

``stage2.output_head`` is the map on base, fitted by NLL on out-of-fold predictions (see :mod:`.crossfit`):

* ``temperature``: base / T (one parameter; with ``pooled``, a, b and c);
* ``vector``: diag(s)·base + β (vector scaling, Kull et al. 2019);
* ``dirichlet``: W·base + β with off-diagonal and bias L2 (ODIR, Kull et al. 2019).

``stage2.adaptive_temperature`` divides the head's logits by a per-prompt temperature T(x) = exp(−Σ_j g_j·c_j(x))
from the calibrators' signals c: log u_max (how typical the prompt is of any axis; a prompt far from every cloud
gets a flatter distribution), and log q^frac and log q^nat of the head's top axis (whether the calibrators agree
with it). The g_j are fitted; T(x) > 0 never changes the top axis, so the calibrators set the confidence and the
router alone the decision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from scipy.optimize import minimize_scalar
from torch import nn

HEADS = ("temperature", "vector", "dirichlet")
TERMS = ("fractal", "natural")  # the calibrators a pooled head can take as terms
SIGNALS = ("typicality", "fractal", "natural")  # what an adaptive temperature reads
ODIR_LAMBDA = 1e-3  # off-diagonal and bias L2 of the Dirichlet head (per mean-NLL unit)


@dataclass
class Parts:
    """MoCaE's per-prompt log-distributions, [N, A] each (None when that part is off); ``typicality`` [N]."""

    router: torch.Tensor
    fractal: torch.Tensor | None = None
    natural: torch.Tensor | None = None
    typicality: torch.Tensor | None = None

    def scatter(self, rows: int, index: torch.Tensor, into: "Parts | None") -> "Parts":
        """These parts written at ``index`` of a [rows, ...] container (created on first use)."""
        if into is None:
            into = Parts(*(None if t is None else t.new_zeros((rows, *t.shape[1:]))
                           for t in (self.router, self.fractal, self.natural, self.typicality)))
        for name in ("router", "fractal", "natural", "typicality"):
            if getattr(self, name) is not None:
                getattr(into, name)[index] = getattr(self, name)
        return into


class OutputHead(nn.Module):
    """z = W·base + β + Σ_t e_t·log q_t, then z / T(x); log w = log_softmax(z). Starts as the identity."""

    def __init__(self, num_axes: int, kind: str = "temperature", terms: tuple[str, ...] = (), signals: tuple[str, ...] = ()):
        super().__init__()
        if kind not in HEADS:
            raise ValueError(f"output head must be one of {', '.join(HEADS)}, got {kind!r}")
        self.kind, self.terms, self.signals = kind, tuple(terms), tuple(signals)
        self.register_buffer("matrix", torch.eye(num_axes))
        self.register_buffer("bias", torch.zeros(num_axes))
        self.register_buffer("exponents", torch.ones(len(self.terms)))
        self.register_buffer("powers", torch.zeros(len(self.signals)))

    def forward(self, base: torch.Tensor, parts: Parts) -> torch.Tensor:
        return torch.log_softmax(self._logits(base, parts, self.matrix, self.bias, self.exponents, self.powers), -1)

    def _logits(self, base, parts, matrix, bias, exponents, powers):
        z = base @ matrix.T + bias
        for exponent, term in zip(exponents, self.terms):
            z = z + exponent * getattr(parts, term)
        if self.signals:
            top = z.argmax(dim=1, keepdim=True)
            signals = torch.stack([parts.typicality if name == "typicality" else getattr(parts, name).gather(1, top)[:, 0]
                                   for name in self.signals], dim=1)
            z = z * torch.exp(signals @ powers)[:, None]  # z / T(x), T(x) = exp(-g·c) > 0
        return z

    @property
    def temperature(self) -> float | None:
        """T of a temperature head (1 / the scale on log p); None for the others."""
        return 1.0 / float(self.matrix[0, 0]) if self.kind == "temperature" else None

    def describe(self) -> dict:
        """The fitted values, rounded, for reports."""
        out = {"kind": self.kind}
        if self.kind == "temperature":
            out["temperature"] = round(self.temperature, 4)
        else:
            out["matrix"] = [[round(float(v), 4) for v in row] for row in self.matrix]
            out["bias"] = [round(float(v), 4) for v in self.bias]
        out.update({f"exponent_{t}": round(float(e), 4) for t, e in zip(self.terms, self.exponents)})
        out.update({f"power_{s}": round(float(g), 4) for s, g in zip(self.signals, self.powers)})
        return out

    def fit(self, base: torch.Tensor, parts: Parts, labels: torch.Tensor, class_balanced: bool = True) -> "OutputHead":
        """Fit the free parameters by (class-balanced) NLL of out-of-fold predictions, with L-BFGS in float64.

        The temperature starts at the 1-D optimum of the temperature alone, so every head starts no worse than
        plain temperature scaling. The exponents and the adaptive temperature's powers start at 0 (calibrators off).
        """
        num_axes = base.shape[1]
        base, labels = base.double(), labels.long()
        parts = Parts(*(None if t is None else t.double() for t in (parts.router, parts.fractal, parts.natural,
                                                                    parts.typicality)))
        counts = torch.bincount(labels, minlength=num_axes).double().clamp_min(1)
        weight = (len(labels) / (num_axes * counts)) if class_balanced else None
        start = math.log(1.0 / nll_temperature(base.float(), labels, weight))
        eye = torch.eye(num_axes, dtype=torch.float64)
        scale = torch.tensor(start, dtype=torch.float64, requires_grad=True)  # temperature: log(1/T)
        diagonal = torch.full((num_axes,), start, dtype=torch.float64, requires_grad=True)  # vector: log s
        full = (eye * math.exp(start)).clone().requires_grad_(True)  # dirichlet
        bias = torch.zeros(num_axes, dtype=torch.float64, requires_grad=True)
        no_bias = torch.zeros(num_axes, dtype=torch.float64)  # a temperature has none
        exponents = torch.zeros(len(self.terms), dtype=torch.float64, requires_grad=True)
        powers = torch.zeros(len(self.signals), dtype=torch.float64, requires_grad=True)
        free = {"temperature": [scale], "vector": [diagonal, bias], "dirichlet": [full, bias]}[self.kind]
        free = free + ([exponents] if self.terms else []) + ([powers] if self.signals else [])

        def matrix():
            if self.kind == "temperature":
                return eye * scale.exp()
            return torch.diag(diagonal.exp()) if self.kind == "vector" else full

        def loss():
            z = self._logits(base, parts, matrix(), bias if self.kind != "temperature" else no_bias, exponents, powers)
            value = F.cross_entropy(z, labels, weight=weight)
            if self.kind == "dirichlet":
                off = full - torch.diag(torch.diagonal(full))
                value = value + ODIR_LAMBDA * (off.pow(2).sum() / max(num_axes * (num_axes - 1), 1) + bias.pow(2).mean())
            return value

        optimizer = torch.optim.LBFGS(free, lr=1.0, max_iter=500, tolerance_grad=1e-9, tolerance_change=1e-12,
                                      line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            value = loss()
            value.backward()
            return value

        optimizer.step(closure)
        with torch.no_grad():
            self.matrix.copy_(matrix().float())
            self.bias.copy_(bias.float() if self.kind != "temperature" else no_bias.float())
            self.exponents.copy_(exponents.float())
            self.powers.copy_(powers.float())
        return self


def nll_temperature(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None = None) -> float:
    """The temperature minimising the (weighted) NLL of ``logits / T`` against ``labels`` (a bounded 1-D search)."""
    logits = logits.double()
    weight = None if weight is None else weight.double()

    def nll(log_t: float) -> float:
        return float(F.cross_entropy(logits / math.exp(log_t), labels, weight=weight))

    result = minimize_scalar(nll, bounds=(math.log(0.05), math.log(20.0)), method="bounded")
    return math.exp(float(result.x))
