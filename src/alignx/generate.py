"""Generation with the axis experts, for every method, through one code path; the Python API.

    from alignx.generate import AlignX
    aligner = AlignX.from_run("runs/demo")                  # method "alignx": MoCaE routing
    for g in aligner.generate(["How do I pick a lock?"]):
        print(g.weights, g.response)

Routed methods run one partial prefill of the base model per batch (experts off, stopping at the deeper of
the router and calibrator layers) to get the prompt features, route, and then generate with per-example
expert weights in the same batch. The router runs once per prompt and adds no per-token cost. A batch
that shares one weight vector merges the weighted experts into the base weights once and decodes at base
speed: this always holds for the fixed-weight methods, and for a routed batch whose prompts were all
routed alike.

Methods: ``base`` (no expert), ``expert-<axis>`` (one expert alone), ``merge-linear`` (task arithmetic:
the three task vectors averaged into the base weights), ``trinityx`` (one global calibrated weight vector
for every prompt, written by Stage 2), the trained baselines of :mod:`alignx.baselines`
(``sft-mix``, ``sft-sequential``, ``merge-ties``, and ``moe-dense``: every decoder MLP replaced by three dense
expert FFNs with a trained top-2 token router, no per-prompt weights), and any router trained by
``alignx stage2``: ``alignx``, ``moe-uncalibrated``, ``paper`` and ablations saved under their ``stage2.name``;
``arrow``, PEFT's training-free Arrow router mixing the three experts per token (:mod:`alignx.baselines.arrow`);
and ``oracle``, which gives each prompt its gold axis's expert alone: the bound on what any router can reach
with these experts. It needs the gold axes (``generate(..., axes=[...])``), so it exists for evaluation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from alignx.axes import AXES
from alignx.baselines import ADAPTER_METHODS, TRAINED_METHODS, is_trained, method_adapters
from alignx.baselines.arrow import load_arrow
from alignx.baselines.moe_dense import load_dense_moe
from alignx.data.formatting import ChatFormatter
from alignx.errors import AlignXError
from alignx.export import resolve_pretrained
from alignx.mixing import MODES, MixtureOfExperts, apply_mode
from alignx.models.checkpoint import CheckpointWeights
from alignx.models.loading import load_base_model, run_model_config
from alignx.models.precision import autocast, autocast_dtype, resolve_precision, store_frozen_linears_in
from alignx.run import RunDir, file_sha256, read_json
from alignx.stage1.features import prompt_features
from alignx.stage2.mocae import MoCaE
from alignx.stage2.pipeline import stage2_dir

FIXED_METHODS = ("base", "merge-linear", "trinityx", *(f"expert-{axis}" for axis in AXES))
ARROW = "arrow"  # PEFT's Arrow router over the three experts, per token (alignx.baselines.arrow)
ORACLE = "oracle"  # each prompt's gold axis's expert, one-hot: the bound on routing with these experts
ROUTER_MODE = "router"  # mix with the router's own mixing weights (stage2.mixing); the others transform its probabilities
ROUTING_MODES = (ROUTER_MODE, *MODES)


@dataclass
class Generation:
    prompt: str
    response: str
    method: str
    weights: dict[str, float] | None = None  # final per-axis expert weights (routed and fixed methods)
    explanation: dict = field(default_factory=dict)  # router / fractal / natural distributions, OOD flag


class AlignX:
    """A base model with its three experts attached and a way to choose their weights per prompt."""

    def __init__(self, run: RunDir, loaded, mixture, method: str, model_config, router=None, mode: str = "router",
                 floor: float = 0.1, fixed: torch.Tensor | None = None, dense=None):
        self.run, self.loaded, self.mixture, self.precision = run, loaded, mixture, model_config
        self.dense = dense  # moe-dense: the DenseMoE handle (its layers replace the MLPs; mixture is None)
        self.fixed = fixed  # the weight vector of a fixed-weight method (None: routed, or the base model)
        self.method, self.router, self.mode, self.floor = method, router, mode, floor

        self.formatter = ChatFormatter(loaded.tokenizer)

    @classmethod
    def from_run(cls, run_dir: str | Path, method: str = "alignx", mode: str = "router", floor: float = 0.1, *,
                 model: str | None = None, trust_remote_code: bool = False) -> "AlignX":
        """Load a run (or an export) for ``method``. The run's config names its base model; ``model`` loads it from
        elsewhere (a hub id, directory, .gguf file or smollm2-135m). The model's own code runs only with
        ``trust_remote_code``, never because the run's config asks (:func:`alignx.models.loading.run_model_config`)."""
        run = RunDir(run_dir)
        model_config = run_model_config(run.load_config().model, run.root, model=model,
                                        trust_remote_code=trust_remote_code)
        if mode not in ROUTING_MODES:
            raise AlignXError(f"unknown routing mode {mode!r}; valid modes: {', '.join(ROUTING_MODES)}")

        routers, singles = trained_routers(run), trained_baselines(run)
        if method not in (*FIXED_METHODS, ARROW, ORACLE) and method not in routers and method not in singles:
            raise AlignXError(
                f"unknown method {method!r} for {run.root}; available: {', '.join(available_methods(run))}"
                + ("" if routers else " (train routers with `alignx stage2`)")
                + ("" if singles else " (baselines sft-mix, sft-sequential, merge-ties, moe-dense: `alignx baseline`)")
            )
        missing = [axis for axis in AXES if not run.has_adapter(axis)]
        if missing:
            raise AlignXError(f"{run.root} has no trained {', '.join(missing)} expert: finish `alignx stage1` first")
        fixed = _fixed_weights(run, method)
        loaded = load_base_model(model_config)
        dense = None
        if method == "moe-dense":  # built before the bf16 storage below, so the experts are merged in fp32
            dense = load_dense_moe(run, loaded.model)
        precision = model_config
        if method == ARROW:  # PEFT's Arrow layer fails under bf16 autocast on CPU (see alignx.baselines.arrow)
            precision = dataclasses.replace(model_config, precision="fp32")
        dtype = autocast_dtype(precision, next(loaded.model.parameters()).device)
        if dtype is not None:  # projections and LM head in the compute dtype (the experts, attached after, follow)
            store_frozen_linears_in(loaded.model, dtype, output_projection=True)
        mixture = None
        if method == ARROW:  # PEFT mixes inside the model, per token; there is no per-prompt weight vector
            loaded.model = load_arrow([run.adapter_dir(axis) for axis in AXES], loaded.model)
        elif dense is None:
            experts = list(method_adapters(method)) if method in singles else list(AXES)
            mixture = MixtureOfExperts.attach(loaded.model, {name: run.adapter_dir(name) for name in experts}, experts,
                                              originals=CheckpointWeights.of(model_config))  # merges in place
        router = MoCaE.load(stage2_dir(run) / method) if method in routers else None
        return cls(run, loaded, mixture, method, precision, router, mode, floor, fixed, dense)

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, method: str = "alignx", mode: str = "router", floor: float = 0.1,
                        revision: str | None = None, *, model: str | None = None,
                        trust_remote_code: bool = False) -> "AlignX":
        """Load an export of ``alignx export`` (or any run directory), local or a hub repository id (only the
        export's files are downloaded, at ``revision`` where given: pin a commit to load exactly what you checked).
        ``model`` and ``trust_remote_code`` as in :meth:`from_run`."""
        return cls.from_run(resolve_pretrained(name_or_path, revision), method=method, mode=mode, floor=floor,
                            model=model, trust_remote_code=trust_remote_code)

    # ---- routing ------------------------------------------------------------------------------------
    def route(self, prompts: list[str]):
        """MoCaE's routing of each prompt (features from one partial prefill of the base model)."""
        device = next(self.loaded.model.parameters()).device
        with self.mixture.using(None):  # the router reads the *base* model's hidden states
            features = prompt_features(  # pooled exactly as the banks the router was fitted on
                self.loaded.model, self.formatter, prompts, self.router.layers, max_length=self.router.max_length,
                autocast_dtype=autocast_dtype(self.precision, device),
            )
        return self.router.route(features[self.router.layers[0]], features[self.router.layers[1]])

    # ---- generation ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(
        self, prompts: list[str], *, max_new_tokens: int = 128, batch_size: int = 8, do_sample: bool = False,
        temperature: float = 0.7, top_p: float = 0.9, seed: int = 0, axes: list[str] | None = None,
    ) -> list[Generation]:
        """Answers to ``prompts``; ``axes`` (each prompt's gold axis) is what the ``oracle`` method routes by."""
        if any(not isinstance(p, str) or not p.strip() for p in prompts):
            raise AlignXError("every prompt must be a non-empty string")
        if axes is not None and len(axes) != len(prompts):
            raise AlignXError(f"{len(prompts)} prompts but {len(axes)} gold axes")
        results: list[Generation] = []
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start : start + batch_size]
            weights, explanation = self.weights_for(batch, None if axes is None else axes[start : start + batch_size])
            texts = self.generate_with(batch, weights, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                       temperature=temperature, top_p=top_p, seed=seed + start)
            for i, (prompt, text) in enumerate(zip(batch, texts)):
                results.append(Generation(prompt, text, self.method, self.named_weights(weights, i), explanation[i]))
        return results

    def prompt_lengths(self, prompts: list[str]) -> list[int]:
        """The number of tokens of each prompt as :meth:`generate_with` feeds it (chat-formatted)."""
        texts = [self.formatter.prompt_text(p) for p in prompts]
        return [len(ids) for ids in self.loaded.tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def weights_for(self, prompts: list[str], axes: list[str] | None = None) -> tuple[torch.Tensor | None, list[dict]]:
        """Each prompt's expert weights (None: experts off) and, for routed methods, its explanation.
        ``axes``: each prompt's gold axis, which only the ``oracle`` method reads."""
        if self.method == ORACLE:
            return _oracle_weights(prompts, axes), [{} for _ in prompts]
        if self.router is not None:
            routing = self.route(prompts)
            weights = routing.weights  # the router's own mixing weights (stage2.mixing), the gate applied
            if self.mode != ROUTER_MODE:  # a mode of the probabilities instead; the gate's fallback wins in every mode
                weights = torch.where(routing.ood[:, None], routing.weights, apply_mode(routing.calibrated, self.mode, self.floor))
            return weights, _explanations(routing, weights)
        weights = None if self.fixed is None else self.fixed.expand(len(prompts), -1)
        return weights, [{} for _ in prompts]

    def named_weights(self, weights: torch.Tensor | None, row: int) -> dict[str, float] | None:
        if weights is None:
            return None
        return {name: round(float(w), 6) for name, w in zip(self.mixture.experts, weights[row])}

    def held(self):
        """Context for a whole pass of a fixed-weight method (an expert, a merge, a trained baseline): its one
        weight vector is merged once, and every :meth:`experts` call inside merges nothing. On 2 cores a merge
        and unmerge of SmolLM2-135M cost about 0.8 s, as much as a forward pass over 8 rows of 180 tokens.
        Routed methods, the oracle and the base model have no one vector to hold: a no-op."""
        if self.mixture is None or self.fixed is None:
            return contextlib.nullcontext()
        return self.mixture.merged(self.fixed)

    def experts(self, weights: torch.Tensor | None, merge: bool = True):
        """Context in which the model runs with these per-example expert weights. A vector shared by the whole
        batch is merged into the base weights, unless ``merge`` is False: a merge and unmerge cost more than the
        low-rank path over a pass of a few hundred tokens (one TruthfulQA MC question)."""
        if self.mixture is None:  # moe-dense, arrow: the token routers inside the model do all the mixing
            return contextlib.nullcontext()
        if weights is None:
            return self.mixture.using(None)
        if merge and bool((weights == weights[0]).all()):
            return self.mixture.merged(weights[0])  # one weight vector: decode at base speed
        return self.mixture.using(weights)

    @torch.inference_mode()
    def generate_with(
        self, prompts: list[str], weights: torch.Tensor | None, *, max_new_tokens: int, do_sample: bool = False,
        temperature: float = 0.7, top_p: float = 0.9, seed: int = 0,
    ) -> list[str]:
        """Decode one batch with the per-example weights of :meth:`weights_for` (the server decodes step by step
        instead, with each request's own sampling: :mod:`alignx.serving.decoding`)."""
        tokenizer = self.loaded.tokenizer
        texts = [self.formatter.prompt_text(p) for p in prompts]
        tokenizer.padding_side = "left"
        try:
            inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        finally:
            tokenizer.padding_side = "right"
        options = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=tokenizer.pad_token_id)
        if do_sample:
            torch.manual_seed(seed)
            options.update(temperature=temperature, top_p=top_p)
        with autocast(self.precision, next(self.loaded.model.parameters()).device), self.experts(weights):
            output = self.loaded.model.generate(**inputs, **options)
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        return [t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


def token_budget_batches(lengths: list[int], max_rows: int, max_tokens: int) -> list[list[int]]:
    """The indices of prompts of these token ``lengths``, shortest first, cut into batches of at most ``max_rows``
    whose padded size (rows x the longest prompt) stays within ``max_tokens``; a longer prompt goes alone.

    A batch is left-padded to its longest prompt, and on a CPU the prefill costs every padded token: one
    500-token prompt among 49 short ones makes the batch cost as if all 50 were 500 tokens long. Sorting
    alone cannot help a long tail; the budget gives it smaller batches (docs/performance.md)."""
    batches: list[list[int]] = []
    for index in sorted(range(len(lengths)), key=lambda i: (lengths[i], i)):
        if batches and len(batches[-1]) < max_rows and (len(batches[-1]) + 1) * lengths[index] <= max_tokens:
            batches[-1].append(index)
        else:
            batches.append([index])
    return batches


def trained_routers(run: RunDir) -> list[str]:
    """The routers ``alignx stage2`` trained in this run (alignx, moe-uncalibrated, paper, ablations)."""
    return sorted(p.name for p in stage2_dir(run).glob("*") if (p / "mocae.json").is_file())


def trained_baselines(run: RunDir) -> list[str]:
    """The baselines ``alignx baseline`` trained in this run (sft-mix, sft-sequential, merge-ties, moe-dense)."""
    return [m for m in TRAINED_METHODS if is_trained(run, m)]


def available_methods(run: RunDir) -> list[str]:
    """Every method this run can generate with (trinityx once Stage 2 has written its weights)."""
    return [*FIXED_METHODS, ARROW, ORACLE, *trained_baselines(run), *trained_routers(run)]


def method_fingerprint(run: RunDir, method: str) -> str:
    """A digest of what decides a method's outputs here: the method, every file :meth:`AlignX.from_run` reads for
    it (the three experts' adapters, a baseline's adapters or routers, a router's directory, Stage 2's global
    weights), the base model it names and the precision it runs in on this machine (``auto`` is bf16 on one CPU
    and fp32 on another). ``alignx eval`` and the axis-loss matrix key every cached answer and loss by it, so a
    retrained expert or a refitted router in the same run directory is scored anew, never silently reused."""
    config = run.load_config()
    sources = [run.adapter_dir(axis) for axis in AXES]
    if method in ADAPTER_METHODS:
        sources += [run.adapter_dir(name) for name in method_adapters(method)]
    elif method == "moe-dense":
        sources.append(run.expert_dir(method))
    elif method == "trinityx":
        sources.append(stage2_dir(run) / "trinityx.json")
    elif (stage2_dir(run) / method / "mocae.json").is_file():
        sources.append(stage2_dir(run) / method)
    precision = "fp32" if method == ARROW else config.model.precision
    digest = hashlib.sha256(json.dumps({"method": method, "model": config.model.name, "precision": str(
        resolve_precision(precision, "cpu"))}, sort_keys=True).encode())
    for source in sources:
        for path in sorted(source.rglob("*")) if source.is_dir() else [source]:
            if path.is_file():
                digest.update(f"{path.relative_to(run.root)}={file_sha256(path)};".encode())
    return digest.hexdigest()[:16]


def _fixed_weights(run: RunDir, method: str) -> torch.Tensor | None:
    """The weight vector of a fixed-weight method; None for the base model and for routed methods."""
    if method == "merge-linear":
        return torch.full((len(AXES),), 1.0 / len(AXES))
    if method == "trinityx":
        path = stage2_dir(run) / "trinityx.json"
        if not path.is_file():
            raise AlignXError(f"trinityx uses the global weights Stage 2 writes: run `alignx stage2 --run {run.root}` first")
        weights = read_json(path)["weights"]
        return torch.tensor([float(weights[axis]) for axis in AXES])
    if method.startswith("expert-"):
        return torch.nn.functional.one_hot(torch.tensor(AXES.index(method.removeprefix("expert-"))), len(AXES)).float()
    if method in ADAPTER_METHODS:
        return torch.ones(len(method_adapters(method)))
    return None


def sample_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """One token from softmax(logits / temperature), cut to the smallest set of top tokens whose probability
    reaches ``top_p`` (nucleus sampling; the most likely token is always kept). In float64 with the maximum
    subtracted first, so any temperature > 0 and top-p > 0 the API admits (down to 5e-324) gives a distribution."""
    logits = logits.double()
    probs = torch.softmax((logits - logits.max()) / temperature, dim=-1)
    if top_p < 1.0:
        ordered, order = probs.sort(descending=True)
        outside = ordered.cumsum(0) - ordered >= top_p  # tokens after the nucleus is already full
        outside[0] = False
        ordered[outside] = 0.0
        probs = torch.zeros_like(probs).scatter(0, order, ordered)
    return int(torch.multinomial(probs, 1, generator=generator))


def _oracle_weights(prompts: list[str], axes: list[str] | None) -> torch.Tensor:
    if axes is None:
        raise AlignXError("the oracle method gives each prompt its gold axis's expert: pass each prompt's axis "
                          "(it exists for `alignx eval` and benchmarks/axis_loss.py, where the gold axis is known)")
    unknown = sorted(set(axes) - set(AXES))
    if unknown:
        raise AlignXError(f"unknown gold axis {unknown[0]!r}; valid: {', '.join(AXES)}")
    if len(axes) != len(prompts):
        raise AlignXError(f"{len(prompts)} prompts but {len(axes)} gold axes")
    return torch.nn.functional.one_hot(torch.tensor([AXES.index(a) for a in axes]), len(AXES)).float()


def _explanations(routing, final: torch.Tensor) -> list[dict]:
    """Per prompt: each distribution MoCaE computed (``probabilities``: the calibrated ones), the weights generation
    mixed the experts with (``final``) and the gate's flag."""
    rows = []
    for i in range(len(final)):
        row = {"router": _as_axes(routing.router[i]), "probabilities": _as_axes(routing.calibrated[i]),
               "final": _as_axes(final[i]), "ood": bool(routing.ood[i])}
        if routing.fractal is not None:
            row["fractal"] = _as_axes(routing.fractal[i])
            row["typicality"] = _as_axes(routing.typicality[i])
        if routing.natural is not None:
            row["natural"] = _as_axes(routing.natural[i])
        rows.append(row)
    return rows


def _as_axes(values: torch.Tensor) -> dict[str, float]:
    return {axis: round(float(v), 4) for axis, v in zip(AXES, values)}
