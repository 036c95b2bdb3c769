"""Routing quality of every router on the same features, in one run: held-out prompts, per source, under shift.

Routers (every learned one fitted on the run's training banks only, its head on out-of-fold predictions over
source groups, exactly as ``alignx stage2`` fits it; see ``alignx.stage2.crossfit``):

* ``moe-uncalibrated`` (p), ``router+T`` (p / T), ``vector`` and ``dirichlet`` scaling of log p (Kull et al. 2019);
  every head is fitted with the axes weighted alike, and ``-unweighted`` rows fit it on the banks' own mix;
* ``paper``: log p + log(0.6·q^frac + 0.4·q^nat), the router trained through it, then T_out; ``paper+dimension``
  with the local-dimension term (β = 1);
* ``pooled``: the router alone, then a·log p + b·log q^frac + c·log q^nat (log-linear pooling); ``pooled-natural``
  and ``pooled-fractal`` with one term; ``pooled-dirichlet``;
* adaptive temperatures (a per-prompt T(x) from the calibrators' signals, which never changes the top axis; see
  ``alignx.stage2.heads``): ``router+adaptive-T`` (the router's decision, the calibrators' confidence),
  ``router+typicality-T`` (the fractal signals only: a prompt far from every cloud gets a flatter distribution),
  ``pooled+adaptive-T``, ``paper+adaptive-T``;
* ``alignx``: the library's default settings (``Stage2Config()``), whichever of the above they are;
* ``arrow``: PEFT's training-free Arrow router on the experts' LoRA factors, its per-prompt expert shares (mean
  over tokens and layers); ``oracle``: the gold axis, one-hot (the ceiling).

**The choice is made without the evaluation prompts.** Each candidate is scored on nested source-group folds of
the training banks (:func:`alignx.stage2.crossfit.nested_scores`: fit on two groups, head from those alone, score
the third); the design with the lowest class-balanced NLL there is the one to make the default. Only then are
the held-out prompts scored, once, for the table: (a) all of them, (b) each source within them (AlpacaEval by
``dataset``, BeaverTails, TruthfulQA by category), (c) sets no router was fitted, chosen or evaluated on, with a
known gold axis (PKU-SafeRLHF prompts, the safety-tuned-llamas harmful sets and XSTest's unsafe prompts, all
harmless; near-duplicates of any bank or evaluation prompt removed), and the out-of-distribution gate's flag rate
there, on XSTest's safe prompts and on random strings.

Everything expensive is cached under ``<run>/routing-quality/`` (features, every fold's fits), so an interrupted
run resumes where it stopped. Last line:
``nll_alignx=<x> nll_temperature=<x> acc_alignx=<x> acc_uncalibrated=<x> ece_alignx=<x> ece_temperature=<x>``
(``temperature`` = ``router+T``, its head fitted as alignx's is), then the same two figures of
``router+T-unweighted``, the stronger temperature baseline on these prompts.

    python benchmarks/routing_quality.py --quick                                       # the demo run, < 5 min
    python benchmarks/routing_quality.py --run runs/routing-full --experts-run runs/demo
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import random
import string
import time
from pathlib import Path

import torch

from alignx.axes import AXES
from alignx.config import Stage2Config
from alignx.data.loading import load_source
from alignx.data.splits import evaluation_prompts, harmful_eval_prompts, xstest_prompts
from alignx.eval.judges.data import near_duplicates
from alignx.eval.metrics import reliability_bins, routing_metrics
from alignx.run import RunDir, atomic_save_safetensors, atomic_write_json, load_safetensors
from alignx.stage2 import crossfit
from alignx.stage2.heads import Parts
from alignx.stage2.mocae import log_weights
from alignx.stage2.pipeline import (
    evaluation_prompts_of,
    load_banks,
    paper_variant,
    plot_reliability,
    prompt_set_features,
    stack_banks,
)
from alignx.stage2.train import fitted_head

SELECTION_METRIC = "balanced_nll"  # the axes' mix differs between banks and use: weigh each axis alike
SHIFT_SETS = ("pku-saferlhf", "harmful-sets", "xstest-unsafe")  # gold axis: harmless
FLAG_ONLY_SETS = ("xstest-safe", "random-strings")
PARTS = ("router", "fractal", "natural", "typicality")


def routers(stage2: Stage2Config) -> dict[str, Stage2Config]:
    """Every learned router, as the Stage 2 settings that train it (the run's seed and split kept)."""
    plain = dict(use_fractal=False, use_natural=False, combination="mixture", adaptive_temperature=False)
    pooled = dict(use_fractal=True, use_natural=True, combination="pooled", output_head="temperature",
                  adaptive_temperature=False, lambda_fractal=1.0, lambda_natural=1.0, dimension_weight=0.0)
    paper = paper_variant(stage2)
    table = {
        "moe-uncalibrated": dict(plain, output_calibration=False),
        "router+T": dict(plain, output_head="temperature"),
        "router+T-unweighted": dict(plain, output_head="temperature", head_class_balanced=False),
        "vector": dict(plain, output_head="vector"),
        "dirichlet": dict(plain, output_head="dirichlet"),
        "paper": dataclasses.asdict(paper),
        "paper+dimension": dict(dataclasses.asdict(paper), dimension_weight=1.0),
        "paper-unweighted": dict(dataclasses.asdict(paper), head_class_balanced=False),
        "paper+dimension-unweighted": dict(dataclasses.asdict(paper), dimension_weight=1.0, head_class_balanced=False),
        "pooled": pooled,
        "pooled-natural": dict(pooled, lambda_fractal=0.0),
        "pooled-fractal": dict(pooled, lambda_natural=0.0),
        "pooled+adaptive-T": dict(pooled, adaptive_temperature=True),
        "pooled-dirichlet": dict(pooled, output_head="dirichlet"),
        "paper+adaptive-T": dict(dataclasses.asdict(paper), adaptive_temperature=True),
        "router+adaptive-T": dict(pooled, lambda_fractal=0.0, lambda_natural=0.0, adaptive_temperature=True),
        "router+typicality-T": dict(pooled, lambda_fractal=0.0, lambda_natural=0.0, use_natural=False,
                                    adaptive_temperature=True),
    }
    base = dataclasses.replace(stage2, output_calibration=True, calibration="cross-fit")
    out = {name: dataclasses.replace(base, **{**changes, "name": name}) for name, changes in table.items()}
    out["alignx"] = dataclasses.replace(Stage2Config(), name="alignx", seed=stage2.seed,
                                        calibration_fraction=stage2.calibration_fraction)
    return out


# ---- prompt sets --------------------------------------------------------------------------------------
def evaluation_sources(config, prompts: list[str]) -> list[str]:
    """The source of each held-out evaluation prompt: AlpacaEval by ``dataset``, BeaverTails, TruthfulQA by category."""
    data_dir = config.data.resolved_data_dir()
    datasets = {r["index"]: r["dataset"] for r in load_source("alpaca_eval", data_dir).rows}
    categories = {r["index"]: r["category"] for r in load_source("truthfulqa", data_dir).rows}
    source_of = {}
    for axis in AXES:
        for example in evaluation_prompts(axis, config.data).examples:
            kind, index = example.id.split(":")[:2]
            name = {"alpaca_eval": lambda: f"alpaca_eval/{datasets[int(index)] or 'unknown'}",
                    "beavertails": lambda: "beavertails",
                    "truthfulqa": lambda: f"truthfulqa/{categories[int(index)]}"}[kind]()
            source_of.setdefault(example.user_text, name)
    return [source_of[p] for p in prompts]


def shift_sets(config, seen: list[str], quick: bool) -> dict[str, list[str]]:
    """Prompt sets no router saw, with near-duplicates of ``seen`` (bank and evaluation prompts) removed."""
    data_dir = config.data.resolved_data_dir()
    xstest = xstest_prompts(config.data)
    sets = {
        "pku-saferlhf": [r["prompt"] for r in load_source("pku_saferlhf", data_dir).rows],
        "harmful-sets": [r["prompt"] for r in harmful_eval_prompts(config.data)],
        "xstest-unsafe": [r["prompt"] for r in xstest if r["label"] == "unsafe"],
        "xstest-safe": [r["prompt"] for r in xstest if r["label"] == "safe"],
    }
    limit = 100 if quick else None
    out = {}
    for name, prompts in sets.items():
        distinct = list(dict.fromkeys(p for p in prompts if p.strip()))
        if name in SHIFT_SETS:  # only a set scored against a gold axis must be unseen
            distinct = [p for p, dup in zip(distinct, near_duplicates(distinct, seen)) if not dup]
        out[name] = random.Random(0).sample(distinct, limit) if limit and len(distinct) > limit else distinct
    rng = random.Random(0)
    alphabet = string.ascii_letters + string.digits + string.punctuation + "     "
    out["random-strings"] = ["".join(rng.choice(alphabet) for _ in range(rng.randint(20, 120)))
                             for _ in range(50 if quick else 200)]  # quick: subsets, so it fits 5 minutes on the slower CPUs
    return out


# ---- cached fits ----------------------------------------------------------------------------------------
class Cache:
    """Parts (and labels) on disk under a key that names everything they depend on; atomic, so resumable."""

    def __init__(self, directory: Path, fingerprint: dict):
        self.directory, self.fingerprint = directory, fingerprint
        directory.mkdir(parents=True, exist_ok=True)

    def path(self, *key) -> Path:
        digest = hashlib.sha256(json.dumps([self.fingerprint, *key], sort_keys=True, default=str).encode()).hexdigest()
        return self.directory / f"{digest[:24]}.safetensors"

    def get(self, key: tuple, compute):
        path = self.path(*key)
        if path.is_file():
            return _unflatten(load_safetensors(path)[0])
        value = compute()
        if value is not None:
            atomic_save_safetensors(_flatten(value), path, {"key": json.dumps(key, default=str)[:2000]})
        return value


def _flatten(value: dict) -> dict[str, torch.Tensor]:
    out = {}
    for name, item in value.items():
        parts, labels = item if isinstance(item, tuple) else (item, None)
        out.update({f"{name}.{p}": getattr(parts, p).contiguous() for p in PARTS if getattr(parts, p) is not None})
        if labels is not None:
            out[f"{name}.labels"] = labels.contiguous()
    return out


def _unflatten(tensors: dict[str, torch.Tensor]) -> dict:
    names = {k.split(".")[0] for k in tensors}
    out = {}
    for name in names:
        parts = Parts(*(tensors.get(f"{name}.{p}") for p in PARTS))
        out[name] = (parts, tensors[f"{name}.labels"]) if f"{name}.labels" in tensors else parts
    return out


def trunk_fits(cache: Cache, trunk: Stage2Config, rows, layers, max_length, features: dict) -> dict:
    """The trunk fitted on all fitting rows as Stage 2 fits it: its out-of-fold parts (for the heads) and the
    parts of every prompt set in ``features``."""

    def compute():
        model = crossfit.fit_trunk(trunk, rows, ~rows.calibration, rows.calibration, layers, max_length)
        oof = crossfit.out_of_fold_parts(trunk, rows, layers, max_length, log=lambda *_: None)
        if oof is None:
            raise SystemExit("the banks are too small for source-group cross-fitting")
        out = {"oof": (oof, rows.labels[~rows.calibration])}
        with torch.no_grad():
            for name, (router, calibrator) in features.items():
                out[name] = model.parts(model.data_for(router, calibrator))
        return out

    return cache.get(("final", crossfit.config_key(trunk), sorted(features)), compute)


# ---- Arrow ------------------------------------------------------------------------------------------------
def arrow_shares(run: RunDir, prompt_sets: dict[str, list[str]], directory: Path, batch_size: int = 16) -> dict:
    """Arrow's per-prompt expert shares on each prompt set (cached per set)."""
    from tqdm import tqdm

    from alignx.baselines.arrow import ArrowShares, load_arrow
    from alignx.data.formatting import ChatFormatter
    from alignx.models.loading import load_base_model

    config = run.load_config()
    adapters = hashlib.sha256(b"".join((run.adapter_dir(a) / "adapter_model.safetensors").read_bytes() for a in AXES))
    out, model = {}, None
    for name, prompts in prompt_sets.items():
        path = directory / f"arrow-{name}-{hashlib.sha256(json.dumps(prompts).encode()).hexdigest()[:12]}" \
                           f"-{adapters.hexdigest()[:12]}.safetensors"
        if path.is_file():
            out[name] = load_safetensors(path)[0]["shares"]
            continue
        if model is None:  # in fp32: PEFT's Arrow layer fails under bf16 autocast (alignx.baselines.arrow)
            loaded = load_base_model(config.model)
            model, tokenizer = load_arrow([run.adapter_dir(axis) for axis in AXES], loaded.model), loaded.tokenizer
            formatter = ChatFormatter(tokenizer)
        texts = [formatter.prompt_text(p) for p in prompts]
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths together: little padding
        shares_of = torch.empty(len(texts), len(AXES))
        for start in tqdm(range(0, len(order), batch_size), desc=f"arrow {name}", leave=False):
            index = order[start : start + batch_size]
            batch = tokenizer([texts[i] for i in index], return_tensors="pt", padding=True, truncation=True,
                              max_length=256, add_special_tokens=False)
            with torch.inference_mode(), ArrowShares(model) as shares:
                model(**batch)
            shares_of[torch.tensor(index)] = shares.per_prompt(batch["attention_mask"])
        out[name] = shares_of
        atomic_save_safetensors({"shares": out[name]}, path)
    return out


# ---- the table ----------------------------------------------------------------------------------------------
def metrics_of(probs: torch.Tensor, labels: torch.Tensor) -> dict:
    return routing_metrics(probs.clamp_min(1e-12) / probs.clamp_min(1e-12).sum(1, keepdim=True), labels, list(AXES))


def by_group(probs, labels, groups: list[str], minimum: int) -> dict:
    """Metrics per source; sources with fewer than ``minimum`` prompts pooled as ``<kind>/other``."""
    counts = {g: groups.count(g) for g in set(groups)}
    named = [g if counts[g] >= minimum else f"{g.split('/')[0]}/other" for g in groups]
    out = {}
    for group in sorted(set(named)):
        index = torch.tensor([i for i, g in enumerate(named) if g == group])
        out[group] = metrics_of(probs[index], labels[index])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/demo", help="the run whose feature banks the routers are fitted on")
    parser.add_argument("--experts-run", help="the run whose trained experts Arrow routes over (default: --run); "
                        "same base model required")
    parser.add_argument("--quick", action="store_true", help="subsets of the prompt sets for Arrow and the shift sets")
    parser.add_argument("--no-arrow", action="store_true", help="leave PEFT's Arrow out")
    args = parser.parse_args()
    started = time.time()
    run = RunDir(args.run)
    config = run.load_config()
    out_dir = run.root / "routing-quality"
    banks = load_banks(run, config)
    rows = stack_banks(banks, config)
    print(f"cpu={torch.backends.cpu.get_cpu_capability()} threads={torch.get_num_threads()} run={run.root} "
          f"banks={ {a: len(banks.rows[a][2]) for a in AXES} }")

    eval_prompts, eval_labels = evaluation_prompts_of(config)
    sources = evaluation_sources(config, eval_prompts)
    seen = [p for a in AXES for p in banks.rows[a][2]] + eval_prompts
    extra = shift_sets(config, seen, args.quick)
    features = {"held_out": prompt_set_features(config, banks, eval_prompts, run.root / "stage2" / "eval_features.safetensors",
                                                "held-out features")}
    for name, prompts in extra.items():
        features[name] = prompt_set_features(config, banks, prompts, out_dir / f"features-{name}.safetensors",
                                             f"{name} features")
    labels = {"held_out": torch.tensor(eval_labels), **{n: torch.full((len(extra[n]),), AXES.index("harmless"))
                                                        for n in SHIFT_SETS}}

    variants = routers(config.stage2)
    cache = Cache(out_dir / "cache", {"banks": banks.fingerprint, "seed": config.stage2.seed})
    layers, max_length = banks.layers, banks.max_length

    # 1. the choice, on nested source-group folds of the training banks only
    candidates = [v for name, v in variants.items() if name != "moe-uncalibrated"]
    nested = crossfit.nested_scores(
        candidates, rows, layers, max_length, log=print,
        fits=lambda trunk, k: cache.get(("nested", crossfit.config_key(trunk), k),
                                        lambda: crossfit.fold_fits(trunk, rows, k, layers, max_length, ("cross-fit",))))
    if nested is None:
        raise SystemExit("the banks are too small for nested source-group folds")
    selection = {name: nested[(name, "cross-fit")] for name in (v.name for v in candidates)}
    chosen = min((n for n in selection if n != "alignx"), key=lambda n: selection[n][SELECTION_METRIC])
    print(f"nested source-group folds ({SELECTION_METRIC}, NLL, ECE): " + ", ".join(
        f"{n} {s[SELECTION_METRIC]:.4f}/{s['nll']:.4f}/{s['ece']:.4f}" for n, s in selection.items()))
    same = [n for n, v in variants.items() if n != "alignx" and dataclasses.replace(v, name="alignx") == variants["alignx"]]
    print(f"chosen on the folds: {chosen}; the library default (alignx) is {', '.join(same) or 'none of the named designs'}")
    if chosen not in same:
        print(f"WARNING: the default is not the design the folds choose ({chosen})")

    # 2. every router once on the held-out and shifted prompts
    results = {}
    for name, variant in variants.items():
        fits = trunk_fits(cache, crossfit.trunk_of(variant), rows, layers, max_length, features)
        head = fitted_head(variant, *fits["oof"]) if variant.output_calibration else None
        with torch.no_grad():
            probs = {s: log_weights(variant, head, fits[s], calibrated=head is not None).exp() for s in features}
        flags = {s: float((fits[s].typicality < math.log(variant.ood_alpha)).float().mean())
                 for s in features} if variant.use_fractal else {}  # the gate of a router that has one
        results[name] = {"probs": probs, "flags": flags, "head": head.describe() if head is not None else None}
    if not args.no_arrow:
        experts = RunDir(args.experts_run or args.run)
        prompts = {"held_out": eval_prompts, **{n: extra[n] for n in SHIFT_SETS}}
        if args.quick:  # a seeded subset of the held-out prompts, the same for Arrow as for the table's Arrow row
            keep = sorted(random.Random(0).sample(range(len(eval_prompts)), min(240, len(eval_prompts))))
            prompts["held_out"] = [eval_prompts[i] for i in keep]
        shares = arrow_shares(experts, prompts, out_dir)
        results["arrow"] = {"probs": shares, "flags": {}, "head": None, "subset": len(prompts["held_out"])}
        if args.quick:
            results["arrow"]["held_out_index"] = keep
    results["oracle"] = {"probs": {s: torch.nn.functional.one_hot(labels[s], len(AXES)).float() for s in labels},
                         "flags": {}, "head": None}

    report = {"cpu": torch.backends.cpu.get_cpu_capability(), "run": str(run.root), "chosen": chosen,
              "default_is": same, "selection_metric": SELECTION_METRIC, "nested": selection,
              "sets": {n: len(p) for n, p in extra.items()}, "routers": {}}
    for name, result in results.items():
        entry = {"head": result["head"], "ood_flag_rate": result["flags"]}
        for s, probs in result["probs"].items():
            gold = labels.get(s)
            if gold is None:
                continue
            if s == "held_out" and "held_out_index" in result:
                gold = gold[torch.tensor(result["held_out_index"])]
                groups = [sources[i] for i in result["held_out_index"]]
            else:
                groups = sources
            entry[s] = metrics_of(probs, gold)
            if s == "held_out":
                entry["per_source"] = by_group(probs, gold, groups, minimum=20)
                entry["reliability"] = reliability_bins(probs, gold)
        report["routers"][name] = entry
    atomic_write_json(out_dir / "report.json", report)
    shown = dict.fromkeys(n for n in ("moe-uncalibrated", "router+T", "dirichlet", "paper", chosen, "alignx", "arrow")
                          if n in report["routers"])
    plot_reliability({n: (report["routers"][n]["reliability"], report["routers"][n]["held_out"]) for n in shown},
                     out_dir / "reliability.png")

    print("\n| router | nested bal. NLL | accuracy | ECE | NLL | Brier | misrouting h/h/h | worst-source ECE | "
          "shift acc | OOD flags (held-out / XSTest safe / random) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, entry in report["routers"].items():
        m = entry["held_out"]
        worst = max(entry["per_source"].items(), key=lambda item: item[1]["ece"])
        shift = " / ".join(f"{entry[s]['accuracy']:.3f}" for s in SHIFT_SETS if s in entry)
        flags = entry["ood_flag_rate"]
        flag_text = " / ".join(f"{flags[s]:.3f}" for s in ("held_out", "xstest-safe", "random-strings")) if flags else ""
        nested_text = f"{selection[name][SELECTION_METRIC]:.4f}" if name in selection else ""
        miss = " / ".join(f"{m['misrouting'][a]:.2f}" for a in AXES)
        print(f"| {name} | {nested_text} | {m['accuracy']:.3f} | {m['ece']:.3f} | {abs(m['nll']):.3f} | {m['brier']:.3f} | "
              f"{miss} | {worst[1]['ece']:.3f} ({worst[0]}) | {shift} | {flag_text} |")
    print("\nper source (accuracy / ECE / NLL), alignx vs router+T:")
    for group, m in report["routers"]["alignx"]["per_source"].items():
        t = report["routers"]["router+T"]["per_source"][group]
        print(f"  {group} (n={m['n']}): {m['accuracy']:.3f}/{m['ece']:.3f}/{m['nll']:.3f} vs "
              f"{t['accuracy']:.3f}/{t['ece']:.3f}/{t['nll']:.3f}")
    print(f"report {out_dir / 'report.json'}, diagrams {out_dir / 'reliability.png'}; {time.time() - started:.0f} s")
    a, t, w, u = (report["routers"][n]["held_out"] for n in ("alignx", "router+T", "router+T-unweighted", "moe-uncalibrated"))
    print(f"nll_alignx={a['nll']:.4f} nll_temperature={t['nll']:.4f} acc_alignx={a['accuracy']:.4f} "
          f"acc_uncalibrated={u['accuracy']:.4f} ece_alignx={a['ece']:.4f} ece_temperature={t['ece']:.4f} "
          f"nll_temperature_unweighted={w['nll']:.4f} ece_temperature_unweighted={w['ece']:.4f}")


if __name__ == "__main__":
    main()
