"""The vLLM hand-off (``alignx serve --backend vllm``): MoCaE routes, vLLM's multi-LoRA engine decodes.

vLLM applies one LoRA adapter per request, not a weighted mixture, so each request's expert weights become
one adapter:

* a one-hot weight vector (``--mode top1``, ``expert-<axis>``, a baseline's single adapter) is the expert's
  own PEFT adapter directory (``RunDir.adapter_dir``);
* all zeros (the out-of-distribution gate's ``base`` fallback) is the base model: no adapter;
* any other vector is rounded to a grid of ``1/grid`` (largest remainder, keeping the rounded total: a routed
  row sums to 1, a stacked method's ``[1, 1, 1]`` stays three full experts) and served by a merged adapter: the experts' factors concatenated along the rank, each B scaled by its weight
  and LoRA scale, which is exactly Σ w_a·scale_a·B_a·A_a (the "cat" merge; no SVD approximation). Merged
  adapters are written once per quantised vector into a private folder and kept in a small LRU cache; a
  request pins its adapter from routing until vLLM has finished it, so eviction never deletes a directory that
  vLLM has yet to load.

A response's ``alignx.weights`` are the weights served, the quantised ones (``[1/3] * 3`` is served, and
reported, as 0.4/0.3/0.3); the router's exact output stays in ``explanation.final``. A request whose client goes
away is aborted in vLLM's engine.

Every adapter has a stable int id derived from its quantised vector, so vLLM's own adapter cache recognises
a vector it has seen. The pure parts (quantisation, ids, the merge, vLLM's arguments) need no vLLM and are
tested without it; :class:`VLLMEngine` imports vLLM lazily.
"""

from __future__ import annotations

import asyncio
import logging
import math
import shutil
import tempfile
import threading
import uuid
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from alignx.errors import AlignXError
from alignx.serving.metrics import Metrics
from alignx.serving.requests import Delta, Failed, Finished, GenerationRequest, QueueFull, Routed
from alignx.serving.tokens import PromptCounter

log = logging.getLogger("alignx.serving")
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts


def quantise(weights: Sequence[float], grid: int = 10) -> tuple[int, ...]:
    """Per-expert weights in [0, 1] -> integer steps of ``1/grid``, each within one step of its weight and
    summing to the weights' rounded total (largest remainder).

    Nothing is renormalised: a routed row (sum 1) keeps summing to ``grid``; all zeros (the gate's ``base``
    fallback) stays all zeros, the base model; a stacked method's ``[1, 1, 1]`` (``sft-sequential``) stays
    three full adapters, not thirds.
    """
    values = [float(w) for w in weights]
    if grid < 1 or not values or not all(math.isfinite(v) and -1e-6 <= v <= 1 + 1e-6 for v in values):
        raise AlignXError(f"cannot quantise expert weights {list(weights)} to a grid of {grid}: each must be in [0, 1]")
    exact = [min(max(v, 0.0), 1.0) * grid for v in values]
    steps = [math.floor(e) for e in exact]
    by_remainder = sorted(range(len(values)), key=lambda i: (-(exact[i] - steps[i]), i))
    for i in by_remainder[: round(sum(exact)) - sum(steps)]:
        steps[i] += 1
    return tuple(steps)


def adapter_id(steps: Sequence[int], grid: int = 10) -> int:
    """A stable positive id per quantised vector (vLLM's ``lora_int_id`` must be > 0)."""
    return 1 + sum(step * (grid + 1) ** i for i, step in enumerate(steps))


@dataclass(frozen=True)
class AdapterChoice:
    """What a request's ``LoRARequest(name, int_id, path)`` points at, and the quantised vector it serves."""

    name: str
    int_id: int
    path: Path
    steps: tuple[int, ...]


def merge_adapters(adapter_dirs: Sequence[Path], weights: Sequence[float], out: Path) -> None:
    """Write the PEFT LoRA adapter whose delta is Σ w_a·scale_a·B_a·A_a, by concatenating the factors.

    The merged adapter has rank Σ r_a (experts with weight 0 left out) and ``lora_alpha = r`` (scale 1), so
    each expert's own scale and weight are folded into its B block.
    """
    from alignx.run import atomic_dir, atomic_save_safetensors, atomic_write_json
    from alignx.stage1.task_vector import adapter_config, lora_factors

    kept = [(Path(d), float(w)) for d, w in zip(adapter_dirs, weights) if w > 0]
    if not kept:
        raise AlignXError("a merged adapter needs at least one expert with a positive weight")
    factors = [lora_factors(d) for d, _ in kept]
    modules = sorted(factors[0])
    if any(sorted(f) != modules for f in factors):
        raise AlignXError("the experts adapt different modules; they cannot be merged into one adapter")
    tensors = {}
    for module in modules:
        parts = [(f[module], w) for f, (_, w) in zip(factors, kept)]
        tensors[f"base_model.model.{module}.lora_A.weight"] = torch.cat([p.A.float() for p, _ in parts], dim=0)
        tensors[f"base_model.model.{module}.lora_B.weight"] = torch.cat([w * p.scale * p.B.float() for p, w in parts], dim=1)
    rank = sum(f[modules[0]].A.shape[0] for f in factors)
    config = {**adapter_config(kept[0][0]), "r": rank, "lora_alpha": rank, "use_rslora": False}
    with atomic_dir(out) as tmp:
        atomic_save_safetensors(tensors, tmp / "adapter_model.safetensors")
        atomic_write_json(tmp / "adapter_config.json", config)


class AdapterCache:
    """Chooses each weight vector's adapter; merged ones live in ``root``, at most ``capacity`` of them (LRU) but
    for those in use: :meth:`choose` pins a merged adapter and :meth:`release` unpins it, and a pinned adapter is
    never evicted (the cache holds more than ``capacity`` while more are in use)."""

    def __init__(self, adapter_dirs: Mapping[str, Path], root: Path, capacity: int = 16, grid: int = 10):
        if capacity < 1:
            raise AlignXError(f"the merged-adapter cache needs room for at least 1 adapter, got {capacity}")
        self.adapter_dirs, self.root, self.capacity, self.grid = dict(adapter_dirs), Path(root), capacity, grid
        self._merged: OrderedDict[tuple[int, ...], Path] = OrderedDict()
        self._pins: dict[tuple[int, ...], int] = {}  # requests using each merged adapter
        self._lock = threading.Lock()

    def served(self, weights: Sequence[float]) -> list[float]:
        """The weights an adapter of :meth:`choose` serves for ``weights``: each rounded to the grid."""
        return [step / self.grid for step in quantise(weights, self.grid)]

    def choose(self, weights: Sequence[float]) -> AdapterChoice | None:
        """The adapter serving these expert weights, pinned until :meth:`release`; None for all-zero weights (the
        base model, no adapter)."""
        steps = quantise(weights, self.grid)
        names = list(self.adapter_dirs)
        if not any(steps):
            return None
        if [step for step in steps if step] == [self.grid]:  # one expert alone, at full weight: its own adapter
            name = names[steps.index(self.grid)]
            return AdapterChoice(name, adapter_id(steps, self.grid), self.adapter_dirs[name], steps)
        label = "-".join(f"{n}{s}" for n, s in zip(names, steps))
        with self._lock:
            path = self._merged.pop(steps, None) or self.root / label
            if not path.is_dir():
                merge_adapters(list(self.adapter_dirs.values()), [s / self.grid for s in steps], path)
            self._merged[steps] = path
            self._pins[steps] = self._pins.get(steps, 0) + 1
            self._evict()
        return AdapterChoice(label, adapter_id(steps, self.grid), path, steps)

    def release(self, choice: AdapterChoice | None) -> None:
        """The request that :meth:`choose` gave ``choice`` is done with it."""
        with self._lock:
            if choice is None or choice.steps not in self._pins:  # the base model, or an expert's own adapter
                return
            self._pins[choice.steps] -= 1
            if not self._pins[choice.steps]:
                del self._pins[choice.steps]
            self._evict()

    def _evict(self) -> None:
        """Delete the least recently used merged adapters that no request uses, down to ``capacity``."""
        idle = [steps for steps in self._merged if steps not in self._pins]
        for steps in idle[: max(0, len(self._merged) - self.capacity)]:
            shutil.rmtree(self._merged.pop(steps), ignore_errors=True)


def max_lora_rank(adapter_dirs: Sequence[Path]) -> int:
    """The smallest rank vLLM accepts that holds a merge of all the experts."""
    from alignx.stage1.task_vector import adapter_config

    total = sum(int(adapter_config(d)["r"]) for d in adapter_dirs)
    for rank in VLLM_LORA_RANKS:
        if rank >= total:
            return rank
    raise AlignXError(f"the experts' ranks sum to {total}, over vLLM's largest LoRA rank {VLLM_LORA_RANKS[-1]}")


def engine_arguments(model: str, adapter_dirs: Sequence[Path], cached_adapters: int) -> dict:
    """``AsyncEngineArgs`` for the base model with multi-LoRA on."""
    return dict(model=model, enable_lora=True, max_lora_rank=max_lora_rank(adapter_dirs),
                max_loras=min(8, cached_adapters + len(adapter_dirs)),
                max_cpu_loras=cached_adapters + len(adapter_dirs))


def sampling_arguments(request: GenerationRequest) -> dict:
    """``SamplingParams`` of a request (vLLM treats temperature 0 as greedy)."""
    return dict(max_tokens=request.max_tokens, temperature=request.sampling.temperature, top_p=request.sampling.top_p,
                seed=request.sampling.seed, stop=list(request.stop) or None)


def model_location(model_name: str) -> str:
    """What vLLM loads for a run's base model: a directory or hub id (GGUF files via their converted cache)."""
    from alignx.models.gguf_cache import gguf_cache
    from alignx.models.source import resolve_model_source

    source = resolve_model_source(model_name)
    return str(gguf_cache(source.path)) if source.kind in ("gguf", "embedded") else source.location


def import_vllm():
    try:
        import vllm
        from vllm.lora.request import LoRARequest
    except ImportError:
        raise AlignXError("--backend vllm needs vLLM (a CUDA machine): pip install 'alignx[vllm]'") from None
    return vllm, LoRARequest


class VLLMEngine:
    """The serving backend that hands decoding to vLLM; routing still runs on this process's copy of the base
    model (one partial prefill per request, in a worker thread)."""

    def __init__(self, aligner, metrics: Metrics, *, max_queue: int = 256, merged_adapters: int = 16):
        self._vllm, self._lora_request = import_vllm()
        if aligner.mixture is None:
            raise AlignXError(f"method {aligner.method} mixes inside the model (no LoRA experts): use --backend hf")
        self.aligner, self.metrics, self.method, self.max_queue = aligner, metrics, aligner.method, max_queue
        adapter_dirs = {name: aligner.run.adapter_dir(name) for name in aligner.mixture.experts}
        self._workdir = Path(tempfile.mkdtemp(prefix="alignx-vllm-adapters-"))
        self.adapters = AdapterCache(adapter_dirs, self._workdir, merged_adapters)
        arguments = engine_arguments(model_location(aligner.precision.name), list(adapter_dirs.values()),
                                     merged_adapters)  # the base model the aligner loaded, remote code off
        self.engine = self._vllm.AsyncLLMEngine.from_engine_args(self._vllm.AsyncEngineArgs(**arguments))
        self.prompts = PromptCounter(aligner.loaded.tokenizer)
        self._route_lock = threading.Lock()
        self._tasks: set[asyncio.Task] = set()

    def submit(self, request: GenerationRequest) -> None:
        if len(self._tasks) >= self.max_queue:
            raise QueueFull
        task = asyncio.get_running_loop().create_task(self._serve(request))
        self._tasks.add(task)
        self.metrics.queue_depth.add(1)
        task.add_done_callback(self._done)

    def health(self) -> str | None:
        return "the vLLM engine has failed" if getattr(self.engine, "errored", False) else None

    def start(self) -> None:
        pass

    def close(self, timeout: float | None = None) -> None:
        """Shut vLLM's engine down (uvicorn has waited for the requests in flight already) and delete the merged
        adapters."""
        shutdown = getattr(self.engine, "shutdown", None)
        if shutdown is not None:
            shutdown()
        shutil.rmtree(self._workdir, ignore_errors=True)

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        self.metrics.queue_depth.add(-1)

    def _route(self, prompt: str):
        """(served weights by expert, explanation, pinned adapter choice, prompt token ids), in a worker thread."""
        with self._route_lock:  # one partial prefill at a time on the routing model
            weights, explanations = self.aligner.weights_for([prompt])
        choice = None if weights is None else self.adapters.choose(weights[0].tolist())  # None: the base model
        explanation = {**explanations[0], "adapter": None if choice is None else choice.name}
        served = None if weights is None else torch.tensor([self.adapters.served(weights[0].tolist())])
        return self.aligner.named_weights(served, 0), explanation, choice, self.prompts.ids(prompt)

    async def _serve(self, request: GenerationRequest) -> None:
        if request.cancelled:
            self.metrics.cancelled_requests.inc()
            return
        choice = request_id = None
        try:
            named, explanation, choice, prompt_ids = await asyncio.to_thread(self._route, request.prompt)
            if request.cancelled:  # the client left while this request was routed
                self.metrics.cancelled_requests.inc()
                return
            request.send(Routed(named, self.method, explanation))
            lora = None if choice is None else self._lora_request(choice.name, choice.int_id, str(choice.path))
            params = self._vllm.SamplingParams(**sampling_arguments(request))
            sent, request_id = "", uuid.uuid4().hex
            outputs = self.engine.generate({"prompt_token_ids": prompt_ids}, params, request_id=request_id,
                                           lora_request=lora)
            request.on_cancel(asyncio.current_task().cancel)  # from now on, a departed client aborts the request
            async for output in outputs:
                completion = output.outputs[0]
                if completion.text.startswith(sent) and len(completion.text) > len(sent):
                    request.send(Delta(completion.text[len(sent) :]))
                    sent = completion.text
                if output.finished:
                    tokens = len(completion.token_ids)
                    self.metrics.generated_tokens.inc(tokens)
                    request.send(Finished("length" if completion.finish_reason == "length" else "stop", tokens))
                    request_id = None  # nothing left to abort
        except asyncio.CancelledError:
            if not request.cancelled:  # not our own cancellation: the server is stopping
                raise
            if request_id is not None:  # cancelled before vLLM finished it
                self.metrics.cancelled_requests.inc()
        except Exception:
            log.exception("vLLM generation failed")
            request.send(Failed(500, "generation failed: the server logged the error"))
        finally:
            if request_id is not None:
                await self.engine.abort(request_id)
            self.adapters.release(choice)
