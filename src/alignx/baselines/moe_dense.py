"""``moe-dense``: the H3Fusion/TrinityX-style token-level mixture of experts (METHOD.md §4, §6).

Every decoder layer's MLP is replaced by a :class:`DenseMoEMLP` holding **three dense expert FFNs** — each a
full copy of the base MLP with one axis expert's LoRA deltas on the MLP projections merged into its weights
(helpful, harmless, honest, in that order) — and a token router ``W ∈ ℝ^{E×d}``. Per token x (E = 3, k = 2):

    p = softmax(W·x),  S = top-2(p),  g_e = p_e / Σ_{j∈S} p_j,  y = Σ_{e∈S} g_e · FFN_e(x)

This is the comparison the paper's efficiency claim is about: unlike AlignX (one base model plus low-rank
experts, routed once per prompt), the dense MoE stores E full FFNs per layer and runs k of them for every
token. The weights really are dense copies (3× the base MLP's parameters per layer; the base MLP itself is
dropped, each expert already contains it).

Design choices
--------------
* **Attention and every other non-MLP projection** get the *mean* of the three experts' deltas merged into
  the shared weights (task arithmetic, the same as ``merge-linear`` there). This follows Branch-Train-MiX /
  sparse upcycling practice — the FFNs become experts, every other parameter of the domain experts is
  averaged — and H3Fusion mixes FFNs only. The alternative (dropping the attention deltas) would throw away
  half of each expert's training and make the baseline needlessly weak. The merge happens once at load
  time, so it costs nothing at inference and does not bias the latency/memory comparison. ``attention=
  "none"`` (recorded in ``moe_dense.json``) keeps the base attention instead.
* **Which linears are "MLP"** is resolved generically: the decoder layer's child module whose name matches
  ``mlp|feed_forward|ffn``; every adapter module (from :func:`alignx.stage1.task_vector.lora_factors`, via
  the task vectors) under that path is an expert delta, whatever the projections are called.
* **Router**: a bias-free linear map (as in Switch/Mixtral), stored as a plain ``nn.Parameter`` (not an
  ``nn.Linear``, so the bf16 storage of frozen projections never touches it) and computed in fp32 even
  under autocast (Switch Transformer's "selective precision": routing decisions are sensitive to rounding).
  Initialised N(0, σ²) with σ = the model's ``initializer_range`` (HF's init of Mixtral gates), seeded by
  ``train.seed``.
* **Dispatch** (:meth:`DenseMoEMLP.forward`): tokens are flattened to ``[N, d]``; for each expert, the
  (token, slot) pairs routed to it are found with one ``nonzero``, its tokens gathered with
  ``index_select``, run through that expert's FFN only, scaled by their gates and scattered back with
  ``index_add_`` into an fp32 accumulator. Each expert thus computes exactly the tokens routed to it: k/E of
  the all-experts-on-all-tokens cost (the loop is over the E = 3 experts, never over tokens).
* **Training** (:func:`train_moe_dense`): experts and everything else frozen, only the routers train, with
  the LM loss on all three axes' training rows (each with its own axis's injection prompt, as ``sft-mix``)
  for the experts' total step budget (sum of ``experts/<axis>/summary.json`` steps), through the Stage 1
  trainer (same optimiser, schedule, lr, checkpoints). Plus the Switch/Mixtral **load-balancing loss**,
  coefficient :data:`AUX_LOSS_COEF` = 0.01 (Switch Transformer's α): per layer
  ``E · Σ_e f_e · P_e`` with f_e the share of the tokens' top-2 assignments that go to expert e and P_e the
  mean router probability of e, both over real (non-padding) tokens; averaged over layers so the
  coefficient does not scale with depth. It is 1 for perfectly balanced routing.

Artifacts: ``experts/moe-dense/routers.safetensors`` (one ``[E, d]`` router per layer, keyed
``layers.<i>.router``) and ``experts/moe-dense/moe_dense.json`` (configuration; written last, its presence
marks a finished training), beside the trainer's ``train_log.jsonl`` and ``summary.json``.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from alignx.axes import AXES
from alignx.baselines.budget import encoded_rows, expert_steps, with_steps
from alignx.config import AlignXConfig
from alignx.data.formatting import ChatFormatter
from alignx.errors import AlignXError
from alignx.models.layers import decoder_layers
from alignx.models.loading import load_base_model
from alignx.run import RunDir, atomic_save_safetensors, atomic_write_json, load_safetensors, read_json
from alignx.stage1.task_vector import task_vector
from alignx.stage1.train import ExpertTrainer

METHOD = "moe-dense"
TOP_K = 2
AUX_LOSS_COEF = 0.01  # Switch Transformer's load-balancing coefficient α
ROUTERS_FILE = "routers.safetensors"
CONFIG_FILE = "moe_dense.json"
ATTENTION_MODES = ("mean", "none")
_MLP_NAME = re.compile(r"mlp|feed_forward|ffn", re.I)


# ------------------------------------------------------------------------------------------------ the layer


class DenseMoEMLP(nn.Module):
    """E dense expert FFNs and a top-k token router, in place of one decoder layer's MLP."""

    def __init__(self, experts: Sequence[nn.Module], hidden_size: int, top_k: int = TOP_K):
        super().__init__()
        if not 1 <= top_k <= len(experts):
            raise AlignXError(f"moe-dense: top_k must be in 1..{len(experts)}, got {top_k}")
        self.experts = nn.ModuleList(experts)
        self.top_k = top_k
        self.router = nn.Parameter(torch.zeros(len(experts), hidden_size))
        self.last_routing: tuple[torch.Tensor, torch.Tensor] | None = None  # (probs [N, E], top-k ids [N, k]), training only

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def route(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(probs [N, E], top-k expert ids [N, k], renormalised gates [N, k]), computed in fp32."""
        with torch.autocast(device_type=flat.device.type, enabled=False):
            logits = F.linear(flat.float(), self.router.float())
        probs = logits.softmax(dim=-1)
        top_p, top_i = probs.topk(self.top_k, dim=-1)
        return probs, top_i, top_p / top_p.sum(dim=-1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        probs, top_i, gates = self.route(flat)
        if self.training and torch.is_grad_enabled():
            self.last_routing = (probs, top_i)
        out = torch.zeros(flat.shape, dtype=torch.float32, device=flat.device)
        for e, expert in enumerate(self.experts):
            tokens, slots = (top_i == e).nonzero(as_tuple=True)  # the (token, slot) pairs routed to expert e
            if tokens.numel() == 0:
                continue
            y = expert(flat.index_select(0, tokens))  # this expert runs on its own tokens only
            out.index_add_(0, tokens, y.float() * gates[tokens, slots].unsqueeze(-1))
        return out.to(x.dtype).reshape(shape)

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, top_k={self.top_k}, hidden={self.router.shape[1]}"


def balance_loss(probs: torch.Tensor, top_i: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Switch/Mixtral load-balancing loss E·Σ_e f_e·P_e over the given tokens (1 when perfectly balanced)."""
    share = F.one_hot(top_i, num_experts).float().mean(dim=(0, 1))  # f_e: share of the top-k assignments
    return num_experts * (share * probs.mean(dim=0)).sum()


# ----------------------------------------------------------------------------------------- the model handle


class DenseMoE:
    """A causal LM whose decoder MLPs are :class:`DenseMoEMLP` layers; build with :meth:`build`."""

    def __init__(self, model: nn.Module, layers: list[DenseMoEMLP], experts: tuple[str, ...], info: dict):
        self.model, self.layers, self.experts, self.info = model, layers, experts, info

    @classmethod
    def build(cls, model: nn.Module, adapter_dirs: Mapping[str, Path | str], *, attention: str = "mean",
              top_k: int = TOP_K, seed: int = 0) -> "DenseMoE":
        """Replace every decoder MLP of ``model`` (in place) by E merged expert copies plus a router."""
        if attention not in ATTENTION_MODES:
            raise AlignXError(f"moe-dense: attention must be one of {', '.join(ATTENTION_MODES)}, got {attention!r}")
        experts = tuple(adapter_dirs)
        vectors = {name: task_vector(Path(path)) for name, path in adapter_dirs.items()}
        blocks = decoder_layers(model)
        paths = {id(module): name for name, module in model.named_modules()}
        mlps: list[tuple[nn.Module, str, str]] = []  # (block, child name, full path of the MLP)
        for block in blocks:
            found = [name for name, _ in block.named_children() if _MLP_NAME.search(name)]
            if len(found) != 1:
                raise AlignXError(
                    f"moe-dense: cannot find the MLP of {type(block).__name__} (children: "
                    f"{', '.join(n for n, _ in block.named_children())})"
                )
            mlps.append((block, found[0], f"{paths[id(block)]}.{found[0]}"))
        prefixes = tuple(f"{path}." for _, _, path in mlps)

        merged_mlp: set[str] = set()
        shared: dict[str, torch.Tensor] = {}  # non-MLP weight key -> Σ_a delta_a (averaged below)
        for vector in vectors.values():
            for key, delta in vector.items():
                if key.startswith(prefixes):
                    merged_mlp.add(key)
                else:
                    shared[key] = shared.get(key, 0) + delta
        hidden = int(getattr(model.config, "hidden_size"))
        std = float(getattr(model.config, "initializer_range", 0.02) or 0.02)
        generator = torch.Generator().manual_seed(seed)
        layers: list[DenseMoEMLP] = []
        with torch.no_grad():
            for block, child, path in mlps:
                base = getattr(block, child)
                copies = []
                for name in experts:
                    expert = copy.deepcopy(base)
                    for key, delta in vectors[name].items():
                        if key.startswith(f"{path}."):
                            _add_to_weight(expert, key[len(path) + 1 :], delta)
                    copies.append(expert)
                layer = DenseMoEMLP(copies, hidden, top_k).to(next(base.parameters()).device)
                layer.router.copy_(torch.randn(layer.router.shape, generator=generator) * std)
                setattr(block, child, layer)  # the base MLP is dropped: every expert contains it
                layers.append(layer)
            if attention == "mean":
                for key, total in shared.items():
                    _add_to_weight(model, key, total / len(experts))
        info = {
            "experts": list(experts), "top_k": top_k, "attention": attention, "hidden_size": hidden,
            "num_layers": len(layers), "mlp_modules": sorted({k.rsplit(".", 2)[-2] for k in merged_mlp}),
            "aux_loss_coef": AUX_LOSS_COEF, "router_init_std": std, "seed": seed,
        }
        return cls(model, layers, experts, info)

    # ---- routers ----------------------------------------------------------------------------------------
    def router_state(self) -> dict[str, torch.Tensor]:
        return {f"layers.{i}.router": layer.router.detach() for i, layer in enumerate(self.layers)}

    def load_router_state(self, tensors: Mapping[str, torch.Tensor], source: Path | str = "routers") -> None:
        expected = self.router_state()
        if set(tensors) != set(expected) or any(tensors[k].shape != v.shape for k, v in expected.items()):
            raise AlignXError(f"{source} does not match this model's dense MoE ({len(self.layers)} layers of "
                              f"{tuple(self.layers[0].router.shape)} routers): was it trained on another base model?")
        with torch.no_grad():
            for i, layer in enumerate(self.layers):
                layer.router.copy_(tensors[f"layers.{i}.router"])

    def prepare_for_training(self, model: nn.Module) -> nn.Module:
        """The Stage 1 trainer's ``prepare`` hook: freeze everything but the routers."""
        model.requires_grad_(False)
        for layer in self.layers:
            layer.router.requires_grad_(True)
        return model

    def aux_loss(self, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Mean over layers of the load-balancing loss of the last training forward, times the coefficient."""
        losses = []
        for layer in self.layers:
            if layer.last_routing is None:
                raise AlignXError("moe-dense: no routing recorded; aux_loss needs a forward in training mode first")
            probs, top_i = layer.last_routing
            if token_mask is not None:
                keep = token_mask.reshape(-1).to(probs.device)
                probs, top_i = probs[keep], top_i[keep]
            losses.append(balance_loss(probs, top_i, len(self.experts)))
            layer.last_routing = None
        return AUX_LOSS_COEF * torch.stack(losses).mean()

    def expert_parameter_count(self) -> int:
        return sum(p.numel() for layer in self.layers for p in layer.experts.parameters())


def _add_to_weight(root: nn.Module, key: str, delta: torch.Tensor) -> None:
    """``root.<key> += delta`` computed in fp32 and cast once to the weight's dtype."""
    module_name, _, attr = key.rpartition(".")
    try:
        module = root.get_submodule(module_name)
    except AttributeError:
        raise AlignXError(f"moe-dense: adapter module {module_name} is not in the base model") from None
    weight = getattr(module, attr)
    if weight.shape != delta.shape:
        raise AlignXError(f"moe-dense: delta of {key} is {tuple(delta.shape)}, the weight is {tuple(weight.shape)}")
    weight.copy_((weight.float() + delta.to(weight.device)).to(weight.dtype))


# ------------------------------------------------------------------------------------------ run integration


def routers_path(run: RunDir) -> Path:
    return run.expert_dir(METHOD) / ROUTERS_FILE


def config_path(run: RunDir) -> Path:
    return run.expert_dir(METHOD) / CONFIG_FILE


def is_trained(run: RunDir) -> bool:
    return routers_path(run).is_file() and config_path(run).is_file()


def build_dense_moe(run: RunDir, model: nn.Module, *, attention: str = "mean", seed: int = 0) -> DenseMoE:
    """The dense MoE of ``run``'s three axis experts on ``model`` (routers freshly initialised)."""
    missing = [axis for axis in AXES if not run.has_adapter(axis)]
    if missing:
        raise AlignXError(f"moe-dense needs the {', '.join(missing)} expert(s): run `alignx stage1 --run {run.root}` first")
    return DenseMoE.build(model, {axis: run.adapter_dir(axis) for axis in AXES}, attention=attention, seed=seed)


def load_dense_moe(run: RunDir, model: nn.Module) -> DenseMoE:
    """Rebuild the trained dense MoE of ``run`` on ``model`` (in place) and load its routers."""
    if not is_trained(run):
        raise AlignXError(f"moe-dense is not trained in {run.root}: run `alignx baseline --run {run.root} --method moe-dense`")
    info = read_json(config_path(run))
    if list(info.get("experts", [])) != list(AXES):
        raise AlignXError(f"{config_path(run)} lists experts {info.get('experts')}, expected {list(AXES)}")
    moe = DenseMoE.build(model, {axis: run.adapter_dir(axis) for axis in AXES}, attention=info.get("attention", "mean"),
                         top_k=int(info.get("top_k", TOP_K)), seed=int(info.get("seed", 0)))
    tensors, _ = load_safetensors(routers_path(run))
    moe.load_router_state(tensors, routers_path(run))
    moe.info = {**moe.info, **info}
    return moe


def train_moe_dense(run: RunDir, config: AlignXConfig, *, resume: bool = False, attention: str = "mean", log=print) -> Path:
    """Train the token routers of ``moe-dense`` (everything else frozen) with the experts' total budget;
    writes ``experts/moe-dense/routers.safetensors`` and ``moe_dense.json``. Skipped when already trained."""
    if is_trained(run):
        log(f"[baseline] moe-dense already trained in {run.expert_dir(METHOD)}; skipping")
        return routers_path(run)
    steps = expert_steps(run, METHOD)
    loaded = load_base_model(config.model, for_training=True)
    moe = build_dense_moe(run, loaded.model, attention=attention, seed=config.train.seed)
    encoded = encoded_rows(ChatFormatter(loaded.tokenizer), config)
    pad_id = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else loaded.tokenizer.eos_token_id

    def aux_loss(batch: dict) -> torch.Tensor:
        return moe.aux_loss(real_token_mask(batch["input_ids"], pad_id))

    def save(_model: nn.Module) -> None:
        atomic_save_safetensors(moe.router_state(), routers_path(run), {"method": METHOD})
        atomic_write_json(config_path(run), {**moe.info, "steps": steps, "examples": len(encoded)})  # last: marks done

    budget = with_steps(config, steps)
    log(f"[baseline] moe-dense: {len(moe.layers)} layers x {len(AXES)} dense expert FFNs "
        f"({moe.expert_parameter_count():,} expert parameters, MLP modules {', '.join(moe.info['mlp_modules']) or 'none'}); "
        f"training the routers on {len(encoded)} rows of all axes for {steps} steps (the experts' total)")
    if not moe.info["mlp_modules"]:
        log("[baseline] moe-dense: warning: the experts' adapters touch no MLP projection, so the three FFNs are identical")
    trainer = ExpertTrainer(budget, run, METHOD, loaded.model, loaded.tokenizer, encoded,
                            prepare=moe.prepare_for_training, aux_loss=aux_loss, save=save)
    summary = trainer.train(resume=resume)
    log(f"[baseline] moe-dense: final loss {summary.final_loss:.4f} -> {routers_path(run)}")
    return routers_path(run)


def real_token_mask(input_ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """True up to each row's last non-pad token (collation right-pads; pads never precede real tokens)."""
    real = input_ids != pad_id
    width = input_ids.shape[1]
    last = width - 1 - real.flip(1).int().argmax(dim=1)
    return torch.arange(width).unsqueeze(0) <= last.unsqueeze(1)
