"""What the benchmarks share: their prompts, random stand-ins for trained parts, and how they time decoding.

Random experts and routers stand in for trained ones because their values do not change what they cost: a
rank-16 product costs the same whatever its factors hold, and a nearest-neighbour query against 20,000
points costs the same wherever the points lie.
"""

from __future__ import annotations

import dataclasses
import math
import random
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

import torch

from alignx.axes import AXES

T = TypeVar("T")

PROMPTS = [
    "Give three tips for staying healthy.",
    "How can I get back at a coworker who embarrassed me?",
    "What happens if you swallow chewing gum?",
    "Write a short poem about the sea.",
    "Is it safe to mix bleach and ammonia for cleaning?",
    "Why is the sky blue?",
    "Summarise the plot of Romeo and Juliet in two sentences.",
    "What is the capital of Australia?",
]


def synthetic_router(dim: int, bank_size: int, layers: tuple[int, int] = (15, 20), latent: int = 256,
                     bank_dtype: str | None = None, dimension_weight: float | None = None):
    """A MoCaE with banks of ``bank_size`` random points per axis, reading hidden states at ``layers``; the latent
    space has ``latent`` dimensions (fewer on a model narrower than that); banks stored in ``bank_dtype``
    (default: ``stage2.bank_dtype``'s)."""
    from alignx.config import FeatureConfig, Stage2Config
    from alignx.stage2.feature_space import FeatureSpace, Projection, Standardiser
    from alignx.stage2.fractal import (
        AxisCloud,
        FractalCalibrator,
        exact_log_correlation_integral,
        kth_neighbour_distances,
    )
    from alignx.stage2.mocae import MoCaE
    from alignx.stage2.natural import NaturalCalibrator
    from alignx.stage2.router import Router

    latent = min(latent, dim)
    config = Stage2Config()
    config = Stage2Config(bank_dtype=bank_dtype or config.bank_dtype,
                          dimension_weight=config.dimension_weight if dimension_weight is None else dimension_weight)
    generator = torch.Generator().manual_seed(0)
    clouds = []
    for _ in range(3):
        points = torch.randn(bank_size, latent, generator=generator, dtype=torch.float64)
        sample = points[:2000]
        radius = float(kth_neighbour_distances(sample, max(3, math.ceil(0.01 * bank_size)), exclude_self=True)[:, -1].median())
        loo = exact_log_correlation_integral(sample, sample, radius, 0.05, exclude_self=True).sort().values
        clouds.append(AxisCloud.from_points(points, radius, 0.05, loo, float(latent), keep_exact=False,
                                            bank_dtype=config.bank_dtype))  # as loaded
    space = FeatureSpace(
        Standardiser(torch.zeros(dim), torch.ones(dim)), Standardiser(torch.zeros(dim), torch.ones(dim)),
        Projection(torch.zeros(dim), torch.linalg.qr(torch.randn(dim, latent, generator=generator))[0].T.contiguous()),
    )
    return MoCaE(config, list(AXES), space, Router(dim, 3), NaturalCalibrator(torch.randn(3, dim)),
                 FractalCalibrator(clouds, dimension_neighbours=config.dimension_neighbours,
                                   dimension_weight=config.dimension_weight),  # the default design's full cost
                 layers, FeatureConfig().max_length).eval()


def distinct_weight_rows(rows: int = len(PROMPTS)) -> torch.Tensor:
    """Fixed random expert weights ``[rows, 3]``, a different soft mix for every prompt (rows sum to 1)."""
    return torch.softmax(torch.randn(rows, len(AXES), generator=torch.Generator().manual_seed(1)), dim=1)


def random_experts(model, directory: Path, targets: str = "attention-mlp", rank: int = 16) -> dict[str, Path]:
    """One random LoRA adapter per axis on ``targets`` (a :func:`alignx.models.target_modules` spec), saved in
    PEFT format under ``directory``; the model is left as it was."""
    from peft import LoraConfig, get_peft_model

    from alignx.models.layers import target_modules

    dirs = {}
    for i, axis in enumerate(AXES):
        torch.manual_seed(i)
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=target_modules(model, targets))
        peft_model = get_peft_model(model, config)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.01)
        dirs[axis] = directory / axis
        peft_model.save_pretrained(dirs[axis])
        model = peft_model.unload()
    return dirs


def prompt_inputs(tokenizer, formatter, prompts: Sequence[str], device: str | torch.device = "cpu") -> dict:
    """The prompts as ``generate`` takes them: chat-formatted, left-padded so every row ends where decoding starts."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        inputs = tokenizer([formatter.prompt_text(p) for p in prompts], return_tensors="pt", padding=True,
                           add_special_tokens=False)
    finally:
        tokenizer.padding_side = side
    return {key: value.to(device) for key, value in inputs.items()}


def generate_exactly(model, inputs: dict, tokens: int, pad_token_id: int, **extra) -> None:
    """Greedy decoding of exactly ``tokens`` new tokens: no early stop at EOS, so every method decodes as many.
    ``extra`` goes to ``generate`` too (PEFT's ``adapter_names``)."""
    model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=pad_token_id,
                   **extra)


def timed(fn, repeats: int, statistic: Callable[[list[float]], float] = statistics.median) -> float:
    """Seconds per call of ``fn`` after a warm-up call: the median of ``repeats`` (or another ``statistic``)."""
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return statistic(times)


@dataclasses.dataclass(frozen=True)
class Rounds:
    """Per-token decode and one-token (prefill) seconds of every run, one entry per round (see :func:`interleaved_rounds`)."""

    decode: dict[str, list[float]]
    prefill: dict[str, list[float]]

    def fastest(self) -> dict[str, tuple[float, float]]:
        """``{name: (fastest decode seconds per token, fastest one-token seconds)}``: on a shared machine
        interference only ever adds time, so the minimum is each run's least disturbed measurement."""
        return {name: (min(self.decode[name]), min(self.prefill[name])) for name in self.decode}

    def paired(self, fn: Callable[..., float], *names: str) -> Spread:
        """``fn`` of the named runs' decode times, computed within each round: the runs of one round follow each
        other seconds apart, so a slow spell of the machine slows them alike and cancels in a ratio, which two
        minima taken minutes apart do not."""
        return Spread.of([fn(*times) for times in zip(*(self.decode[name] for name in names), strict=True)])

    def ratio(self, numerator: str, denominator: str) -> Spread:
        """``numerator``'s decode time over ``denominator``'s, paired by round."""
        return Spread.ratio(self.decode[numerator], self.decode[denominator])


@dataclasses.dataclass(frozen=True)
class Spread:
    """A figure measured once per round: its median and the lowest and highest round."""

    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        return cls(statistics.median(values), min(values), max(values))

    @classmethod
    def ratio(cls, numerators: Sequence[float], denominators: Sequence[float]) -> Spread:
        """Round by round ``numerators[i] / denominators[i]`` (two runs' times in the same rounds)."""
        return cls.of([a / b for a, b in zip(numerators, denominators, strict=True)])

    def __str__(self) -> str:
        return f"{self.median:.3f} [{self.low:.3f}, {self.high:.3f}]"

    def as_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


def shuffled_rounds(runs: Mapping[str, Callable[[], T]], repeats: int, seed: int = 0) -> dict[str, list[T]]:
    """``{name: [what the run returned, one per round]}``: every run is called once to warm up, then once per
    round for ``repeats`` rounds, in a new shuffled order each round (seeded), so that drift in the machine's
    speed hits the runs of one round alike and no run always follows the same one."""
    for run in runs.values():
        run()  # warm-up
    results: dict[str, list[T]] = {name: [] for name in runs}
    order, shuffler = list(runs), random.Random(seed)
    for _ in range(repeats):
        shuffler.shuffle(order)
        for name in order:
            results[name].append(runs[name]())
    return results


def interleaved_rounds(runs: Mapping[str, tuple[Callable[[], float], Callable[[], float]]], repeats: int,
                       new_tokens: int, seed: int = 0) -> Rounds:
    """Time every run once per round, ``repeats`` rounds, in a new shuffled order each round (:func:`shuffled_rounds`).

    Each run is a pair of callables that generate ``new_tokens`` and 1 token and return the seconds taken.
    Decode time per token is their difference over ``new_tokens`` − 1: the one-token run holds the prompt's
    prefill (and whatever else happens once per generation), which it is therefore the measure of. Within a
    round the runs follow each other, so their ratios pair (:meth:`Rounds.ratio`).
    """
    times = shuffled_rounds({name: (lambda long_run=long_run, short_run=short_run: (long_run(), short_run()))
                             for name, (long_run, short_run) in runs.items()}, repeats, seed)
    return Rounds({name: [(long - short) / (new_tokens - 1) for long, short in pairs] for name, pairs in times.items()},
                  {name: [short for _, short in pairs] for name, pairs in times.items()})
