"""The mixed-expert LoRA layer against independent references: PEFT's own adapters, task-vector merges,
and each example run alone."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import assert_close_at_scale, build_tiny_model
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from alignx.config import ModelConfig
from alignx.errors import AlignXError
from alignx.mixing import ExpertWeights, MixedLoRALinear, MixtureOfExperts, apply_mode
from alignx.models.checkpoint import CheckpointWeights
from alignx.models.loading import load_base_model
from alignx.models.precision import store_frozen_linears_in
from alignx.stage1.task_vector import LoraFactors, task_vector

EXPERTS = ["helpful", "harmless", "honest"]
TARGETS = ["q_proj", "v_proj", "down_proj"]
TEXTS = [
    "Give three tips for staying healthy.",
    "Hello there, how are you today?",
    "Answer truthfully: nothing happens if you eat watermelon seeds.",
]


def _base(model_dir) -> nn.Module:
    return load_base_model(ModelConfig(name=str(model_dir), precision="fp32")).model


def _save_adapter(model: nn.Module, path, seed: int, r: int = 4, alpha: int = 8, targets=TARGETS):
    torch.manual_seed(seed)  # lora_A's random init
    peft = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=targets))
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)  # B starts at zero; make every expert do something different
    peft.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_model_dir) -> dict:
    root = tmp_path_factory.mktemp("experts")
    dirs = {name: _save_adapter(_base(tiny_model_dir), root / name, seed) for seed, name in enumerate(EXPERTS, 1)}
    dirs["wide"] = _save_adapter(_base(tiny_model_dir), root / "wide", seed=7, r=8, alpha=16)  # another rank
    return dirs


@pytest.fixture(scope="module")
def batch(tiny_tokenizer):
    """The three texts right-padded into one batch, plus each one unpadded."""
    rows = [tiny_tokenizer(t)["input_ids"] for t in TEXTS]
    assert len({len(r) for r in rows}) == 3  # different lengths: the padding is exercised
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tiny_tokenizer.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return {"input_ids": ids, "attention_mask": mask, "rows": [torch.tensor([r]) for r in rows]}


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@pytest.fixture(scope="module")
def peft_logits(tiny_model_dir, adapters, batch) -> dict[str, torch.Tensor]:
    """Each expert run alone through PEFT on a fresh base: the reference for one-hot weights."""
    return {name: _logits(PeftModel.from_pretrained(_base(tiny_model_dir), path).eval(), batch)
            for name, path in adapters.items()}


@pytest.fixture(scope="module")
def mixture(tiny_model_dir, adapters) -> MixtureOfExperts:
    return MixtureOfExperts.attach(_base(tiny_model_dir), {a: adapters[a] for a in EXPERTS}, EXPERTS)


@pytest.fixture(scope="module")
def in_place_mixture(tiny_model_dir, adapters) -> MixtureOfExperts:
    """The same experts, with the base model's weights file to restore merged weights from."""
    return MixtureOfExperts.attach(_base(tiny_model_dir), {a: adapters[a] for a in EXPERTS}, EXPERTS,
                                   originals=CheckpointWeights(tiny_model_dir))


def _task_vector_model(model_dir, adapters, weights: dict[str, float]) -> nn.Module:
    """A fresh base with Σ w_a·τ_a added to its weights: task arithmetic, independent of the mixed layer."""
    model = _base(model_dir)
    state = model.state_dict()
    for name, w in weights.items():
        for key, delta in task_vector(adapters[name]).items():
            state[key] = state[key] + w * delta
    model.load_state_dict(state)
    return model


def test_one_hot_weights_equal_each_single_peft_adapter(mixture, peft_logits, batch):
    assert len(mixture.layers) == 3 * 3 and mixture.ranks == (4, 4, 4)
    for i, name in enumerate(EXPERTS):
        with mixture.using(torch.eye(3)[i]):
            logits = _logits(mixture.model, batch)
        assert_close_at_scale(logits, peft_logits[name])
    # the experts really differ, so a wrong expert could not pass
    assert (peft_logits["helpful"] - peft_logits["honest"]).abs().max() > 0.1


def test_per_example_weights_equal_each_example_alone(mixture, batch):
    weights = torch.tensor([[1.0, 0.0, 0.0], [0.2, 0.5, 0.3], [0.0, 0.0, 1.0]])
    with mixture.using(weights):
        together = _logits(mixture.model, batch)
    for i, ids in enumerate(batch["rows"]):
        with mixture.using(weights[i]), torch.no_grad():
            alone = mixture.model(input_ids=ids).logits[0]
        assert_close_at_scale(together[i, : ids.shape[1]], alone)
    with mixture.using(weights[1]), torch.no_grad():  # a single row applies to the whole batch
        assert_close_at_scale(_logits(mixture.model, batch)[1], together[1])


def test_top1_mode_equals_the_argmax_expert(mixture, peft_logits, batch):
    weights = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.25, 0.35, 0.4]])
    with mixture.using(apply_mode(weights, "top1")):
        logits = _logits(mixture.model, batch)
    for i, name in enumerate(EXPERTS):  # row i's argmax is expert i
        assert_close_at_scale(logits[i], peft_logits[name][i])


def test_soft_weights_equal_merging_the_task_vectors(mixture, tiny_model_dir, adapters, batch):
    weights = [0.2, 0.5, 0.3]
    with mixture.using(torch.tensor(weights)):
        mixed = _logits(mixture.model, batch)
    merged = _logits(_task_vector_model(tiny_model_dir, adapters, dict(zip(EXPERTS, weights))), batch)
    assert_close_at_scale(mixed, merged)


def test_experts_of_different_ranks(tiny_model_dir, adapters, peft_logits, batch):
    order = ["helpful", "wide", "honest"]
    mixture = MixtureOfExperts.attach(_base(tiny_model_dir), {a: adapters[a] for a in order}, order)
    assert mixture.ranks == (4, 8, 4)
    assert next(iter(mixture.layers.values())).A.shape[0] == 16  # concatenated, no padding
    with mixture.using(torch.tensor([0.0, 1.0, 0.0])):
        assert_close_at_scale(_logits(mixture.model, batch), peft_logits["wide"])
    weights = [0.3, 0.45, 0.25]
    with mixture.using(torch.tensor(weights)):
        mixed = _logits(mixture.model, batch)
    merged = _logits(_task_vector_model(tiny_model_dir, adapters, dict(zip(order, weights))), batch)
    assert_close_at_scale(mixed, merged)


@pytest.mark.parametrize("which", ["mixture", "in_place_mixture"])
def test_merge_equals_the_mixed_forward_and_unmerge_is_exact(which, request, batch):
    mixture = request.getfixturevalue(which)
    assert all(layer.merges_in_place == (which == "in_place_mixture") for layer in mixture.layers.values())
    weights = torch.tensor([0.2, 0.5, 0.3])
    originals = {name: layer.base.weight.detach().clone() for name, layer in mixture.layers.items()}
    with mixture.using(weights):
        mixed = _logits(mixture.model, batch)
    mixture.merge(weights)
    try:
        assert mixture.is_merged and all(layer.merged for layer in mixture.layers.values())
        assert not any(torch.equal(layer.base.weight, originals[n]) for n, layer in mixture.layers.items())
        with pytest.raises(RuntimeError, match="unmerge"):
            mixture.set_weights(weights)
        merged = _logits(mixture.model, batch)  # the low-rank path is off: weights None here
    finally:
        mixture.unmerge()
    assert_close_at_scale(merged, mixed)
    assert all(torch.equal(layer.base.weight, originals[n]) for n, layer in mixture.layers.items())
    with mixture.merged(weights):  # merging again with other weights and the context manager
        pass
    assert all(torch.equal(layer.base.weight, originals[n]) for n, layer in mixture.layers.items())


def test_a_nested_merge_of_the_same_weights_merges_nothing_and_other_weights_restore_the_outer(
        in_place_mixture, batch, monkeypatch):
    mixture = in_place_mixture
    outer, inner = torch.tensor([0.2, 0.5, 0.3]), torch.tensor([0.0, 1.0, 0.0])
    originals = {name: layer.base.weight.detach().clone() for name, layer in mixture.layers.items()}
    with mixture.merged(outer):
        held = {name: layer.base.weight.detach().clone() for name, layer in mixture.layers.items()}
        expected = _logits(mixture.model, batch)
        merges = []
        monkeypatch.setattr(MixtureOfExperts, "merge", lambda self, w: merges.append(w))
        with mixture.merged(outer.tolist()):  # the same vector, given as a list
            assert_close_at_scale(_logits(mixture.model, batch), expected)
        assert merges == []
        monkeypatch.undo()
        with mixture.merged(inner):
            assert torch.equal(mixture.merged_weights, inner)
        assert torch.equal(mixture.merged_weights, outer)
        assert all(torch.equal(layer.base.weight, held[n]) for n, layer in mixture.layers.items())
    assert not mixture.is_merged
    assert all(torch.equal(layer.base.weight, originals[n]) for n, layer in mixture.layers.items())


def _merged_storage(mixture: MixtureOfExperts) -> tuple[list[bool], list[bool]]:
    """Per layer, while merged: whether the weight keeps its storage, and whether an original is kept aside."""
    storage = {name: layer.base.weight.data_ptr() for name, layer in mixture.layers.items()}
    with mixture.merged([0.2, 0.5, 0.3]):
        same = [layer.base.weight.data_ptr() == storage[name] for name, layer in mixture.layers.items()]
        kept = [layer._original_weight is not None for layer in mixture.layers.values()]
    return same, kept


def test_an_in_place_merge_holds_no_second_copy_of_the_weights(in_place_mixture, mixture):
    same, kept = _merged_storage(in_place_mixture)
    assert all(same) and not any(kept)
    same, kept = _merged_storage(mixture)  # by copy: a new weight, the original kept aside
    assert not any(same) and all(kept)


def test_a_weight_that_differs_from_its_file_merges_by_copy(tiny_model_dir, adapters, batch):
    model = _base(tiny_model_dir)
    changed = next(m for name, m in model.named_modules() if name.endswith("q_proj"))
    with torch.no_grad():
        changed.weight.add_(1e-3)  # no longer the file's tensor: reading it back would not restore it
    before = changed.weight.detach().clone()
    mixture = MixtureOfExperts.attach(model, {a: adapters[a] for a in EXPERTS}, EXPERTS,
                                      originals=CheckpointWeights(tiny_model_dir))
    in_place = {name: layer.merges_in_place for name, layer in mixture.layers.items()}
    assert not in_place[next(n for n, layer in mixture.layers.items() if layer.base is changed)]
    assert sum(in_place.values()) == len(in_place) - 1
    with mixture.merged([0.0, 1.0, 0.0]):
        pass
    assert torch.equal(changed.weight, before)


@pytest.mark.parametrize("fault", ["changed", "deleted"])
def test_unmerge_detects_a_weights_file_changed_or_deleted_and_leaves_a_consistent_model(
        fault, tiny_model_dir, adapters, batch, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    mixture = MixtureOfExperts.attach(_base(model_dir), {a: adapters[a] for a in EXPERTS}, EXPERTS,
                                      originals=CheckpointWeights(model_dir))
    assert all(layer.merges_in_place for layer in mixture.layers.values())
    originals = {name: layer.base.weight.detach().clone() for name, layer in mixture.layers.items()}
    weights = torch.tensor([0.2, 0.5, 0.3])
    with mixture.using(weights):
        mixed = _logits(mixture.model, batch)
    (weights_file,) = model_dir.glob("*.safetensors")
    mixture.merge(weights)
    if fault == "changed":  # every original off by 0.01: unmerging from it would serve other weights, silently
        tensors = load_file(weights_file)
        save_file({key: value + 0.01 for key, value in tensors.items()}, weights_file, metadata={"format": "pt"})
    else:
        weights_file.unlink()
    with pytest.raises(AlignXError, match="has changed since the model was loaded" if fault == "changed"
                       else "cannot read .* back from"):
        mixture.unmerge()
    # consistent: unmerged, every weight within one rounding of its original, the low-rank path back
    assert not mixture.is_merged and not any(layer.merged for layer in mixture.layers.values())
    for name, layer in mixture.layers.items():
        assert_close_at_scale(layer.base.weight, originals[name], ulps=4)
    with mixture.using(weights):
        assert_close_at_scale(_logits(mixture.model, batch), mixed)
    # and the model keeps working: its merges are by copy now, and unmerge restores exactly what it had
    restored = {name: layer.base.weight.detach().clone() for name, layer in mixture.layers.items()}
    with mixture.merged(weights):
        assert_close_at_scale(_logits(mixture.model, batch), mixed)
    assert all(torch.equal(layer.base.weight, restored[n]) for n, layer in mixture.layers.items())


def test_no_weights_is_exactly_the_base_model(mixture, tiny_model_dir, batch):
    mixture.set_weights(None)
    assert torch.equal(_logits(mixture.model, batch), _logits(_base(tiny_model_dir), batch))


def test_detach_restores_the_original_modules(tiny_model_dir, adapters, batch):
    model = _base(tiny_model_dir)
    before = _logits(model, batch)
    mixture = MixtureOfExperts.attach(model, {a: adapters[a] for a in EXPERTS}, EXPERTS)
    names = list(mixture.layers)
    mixture.merge([0.0, 1.0, 0.0])
    assert mixture.detach() is model
    assert not any(isinstance(m, MixedLoRALinear) for m in model.modules())
    assert all(type(model.get_submodule(n)) is nn.Linear for n in names)
    assert torch.equal(_logits(model, batch), before)


def test_greedy_generate_with_per_example_weights_equals_each_alone(mixture, tiny_tokenizer):
    prompts = [tiny_tokenizer(t)["input_ids"] for t in TEXTS[:2]]
    pad = tiny_tokenizer.pad_token_id
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])  # left-padded
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    weights = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.3, 0.7]])
    options = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=pad)
    with mixture.using(weights), torch.no_grad():
        together = mixture.model.generate(input_ids=ids, attention_mask=mask, **options)[:, width:]
    assert together.shape == (2, 5)
    for i, p in enumerate(prompts):
        with mixture.using(weights[i]), torch.no_grad():
            alone = mixture.model.generate(input_ids=torch.tensor([p]), **options)[0, len(p):]
        assert together[i].tolist() == alone.tolist()


# ------------------------------------------------------------------------- the production bf16 path
# `alignx generate`, `eval` and `serve` store the frozen projections and the LM head in bf16 and run under bf16
# autocast wherever `precision: auto` finds native bf16 (on AVX2-only CPUs torch still runs it, emulated).


@pytest.fixture(scope="module", params=["by-copy", "in-place"])
def bf16_mixture(request, tiny_model_dir, adapters) -> MixtureOfExperts:
    model = _base(tiny_model_dir)
    store_frozen_linears_in(model, torch.bfloat16, output_projection=True)  # as AlignX.from_run does
    originals = CheckpointWeights(tiny_model_dir) if request.param == "in-place" else None
    mixture = MixtureOfExperts.attach(model, {a: adapters[a] for a in EXPERTS}, EXPERTS, originals=originals)
    assert all(layer.merges_in_place == (originals is not None) for layer in mixture.layers.values())
    return mixture


def _bf16_logits(model, batch) -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return _logits(model, batch).float()


def test_bf16_storage_holds_projections_and_head_in_bf16(bf16_mixture):
    layer = next(iter(bf16_mixture.layers.values()))
    # the experts' factors are stored in the weight's dtype, A as extra rows of the weight itself
    assert layer.base.weight.dtype == layer.A.dtype == layer.B_t.dtype == torch.bfloat16
    assert layer.base.weight.data_ptr() == layer.stacked.data_ptr()  # a view: the weight is not held twice
    assert bf16_mixture.model.get_output_embeddings().weight.dtype == torch.bfloat16


def test_bf16_per_example_weights_equal_each_example_alone(bf16_mixture, batch):
    weights = torch.tensor([[1.0, 0.0, 0.0], [0.2, 0.5, 0.3], [0.0, 0.0, 1.0]])
    with bf16_mixture.using(weights):
        together = _bf16_logits(bf16_mixture.model, batch)
    for i, ids in enumerate(batch["rows"]):
        with bf16_mixture.using(weights[i]):
            alone = _bf16_logits(bf16_mixture.model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})[0]
        # a row's sums do not depend on the other rows: bf16 rounding of the same values, a few units at most
        assert_close_at_scale(together[i, : ids.shape[1]], alone, ulps=4 * 2**16)  # 4 bf16 units, in fp32 eps


def test_bf16_merged_equals_unmerged_and_unmerge_restores_the_bf16_weights(bf16_mixture, batch):
    weights = torch.tensor([0.2, 0.5, 0.3])
    originals = {name: layer.base.weight.detach().clone() for name, layer in bf16_mixture.layers.items()}
    with bf16_mixture.using(weights):
        unmerged = _bf16_logits(bf16_mixture.model, batch)
    with bf16_mixture.merged(weights):
        assert all(layer.base.weight.dtype == torch.bfloat16 for layer in bf16_mixture.layers.values())
        merged = _bf16_logits(bf16_mixture.model, batch)
    assert all(torch.equal(layer.base.weight, originals[n]) for n, layer in bf16_mixture.layers.items())
    with bf16_mixture.using(weights.flip(0)):  # other weights: what the tolerance must still tell apart
        wrong = _bf16_logits(bf16_mixture.model, batch)
    # merging rounds W0 + delta to bf16 once per weight, the factored path rounds the activations instead
    tolerance = 16 * 2**-8 * float(unmerged.abs().max())  # 16 bf16 units at the logits' scale (~7 measured)
    assert float((merged - unmerged).abs().max()) < tolerance < float((wrong - unmerged).abs().max())


def test_bf16_path_tracks_the_fp32_path(bf16_mixture, mixture, batch):
    weights = torch.tensor([[1.0, 0.0, 0.0], [0.2, 0.5, 0.3], [0.0, 0.0, 1.0]])
    with mixture.using(weights):
        exact = _logits(mixture.model, batch)
    with bf16_mixture.using(weights):
        bf16 = _bf16_logits(bf16_mixture.model, batch)
    with mixture.using(weights.flip(1)):
        wrong = _logits(mixture.model, batch)
    tolerance = 16 * 2**-8 * float(exact.abs().max())  # bf16 rounding through every layer: ~7 units measured
    assert float((bf16 - exact).abs().max()) < tolerance < float((wrong - exact).abs().max())


# ------------------------------------------------------------------------------------- mismatched adapters


def _other_adapter(tmp_path, tiny_tokenizer, kind: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    if kind == "more layers":
        return _save_adapter(build_tiny_model("llama", len(tiny_tokenizer), num_layers=4), tmp_path / kind, 9)
    if kind == "other sizes":
        config = AutoConfig.for_model("llama", vocab_size=len(tiny_tokenizer), hidden_size=64, intermediate_size=96,
                                      num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)
        return _save_adapter(AutoModelForCausalLM.from_config(config), tmp_path / kind, 9)
    model = build_tiny_model("llama", len(tiny_tokenizer))
    return _save_adapter(model, tmp_path / kind, 9, targets=["q_proj", "v_proj"])


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("more layers", r"expert honest .* targets modules model\.layers\.3\..* that the base model .* does not have"),
        ("other sizes", r"rank/shape mismatch: expert honest .* module model\.layers\.0\.mlp\.down_proj maps 96 -> 64"),
        ("other targets", r"experts helpful and honest target different modules; only helpful targets .*down_proj"),
    ],
)
def test_mismatched_adapters_are_clear_errors(tmp_path, tiny_model_dir, tiny_tokenizer, adapters, kind, message):
    model = _base(tiny_model_dir)
    dirs = {"helpful": adapters["helpful"], "harmless": adapters["harmless"],
            "honest": _other_adapter(tmp_path, tiny_tokenizer, kind)}
    with pytest.raises(AlignXError, match=message):
        MixtureOfExperts.attach(model, dirs, EXPERTS)
    assert not any(isinstance(m, MixedLoRALinear) for m in model.modules())  # checked before touching it


def test_expert_order_and_weight_shapes_are_checked(mixture, tiny_model_dir, adapters):
    with pytest.raises(AlignXError, match="no adapter for honest"):
        MixtureOfExperts.attach(_base(tiny_model_dir), {a: adapters[a] for a in EXPERTS[:2]}, EXPERTS)
    with pytest.raises(AlignXError, match=r"shape \[3\] or \[batch, 3\]"):
        mixture.set_weights(torch.ones(2, 4))
    with pytest.raises(AlignXError, match="already has experts attached"):
        MixtureOfExperts.attach(mixture.model, {a: adapters[a] for a in EXPERTS}, EXPERTS)
    with pytest.raises(AlignXError, match="one weight vector"):
        mixture.merge(torch.ones(2, 3))


# ------------------------------------------------------------------------------------------- the layer alone


def _layer(dtype=torch.float32):
    torch.manual_seed(0)
    base = nn.Linear(16, 8).to(dtype)
    factors = [LoraFactors(A=torch.randn(r, 16), B=torch.randn(8, r), scale=s) for r, s in ((2, 0.5), (3, 2.0))]
    holder = ExpertWeights([2, 3])
    return MixedLoRALinear(base, factors, holder), factors


def test_layer_mixes_rank_slices_per_example():
    layer, factors = _layer()
    x = torch.randn(3, 5, 16)
    weights = torch.tensor([[1.0, 0.0], [0.3, 0.7], [-0.5, 2.0]])
    layer.holder.set(weights)
    expected = torch.stack([
        layer.base(x[b]) + sum(w * f.scale * x[b] @ f.A.T @ f.B.T for w, f in zip(weights[b], factors))
        for b in range(3)
    ])
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer(x[:, 0]), expected[:, 0], rtol=1e-5, atol=1e-5)  # [N, in] inputs
    # generate's num_return_sequences repeats each example k times in a row
    torch.testing.assert_close(layer(x.repeat_interleave(2, 0)), expected.repeat_interleave(2, 0), rtol=1e-5, atol=1e-5)
    with pytest.raises(AlignXError, match="3 rows but the batch has 4"):
        layer(torch.randn(4, 16))


def test_layer_holds_the_base_weight_once_and_relinks_after_a_copy():
    layer, factors = _layer()
    assert layer.base.weight.data_ptr() == layer.stacked.data_ptr()  # the base weight is a view of the stacked rows
    torch.testing.assert_close(layer.A, torch.cat([f.A for f in factors]))
    layer.holder.set([0.4, 0.6])
    x = torch.randn(2, 3, 16)
    before = layer(x)
    layer.base.weight.data = layer.base.weight.data.clone()  # what a clone or module.to leaves: two tensors
    layer._buffers["stacked"] = layer.stacked.clone()
    torch.testing.assert_close(layer(x), before, rtol=0, atol=0)
    assert layer.base.weight.data_ptr() == layer.stacked.data_ptr()


def test_conv1d_layer_with_bias_mixes_like_the_reference():
    torch.manual_seed(0)
    base = Conv1D(8, 16)  # GPT-2's [in, out] layout, with a bias
    base.bias.data.normal_()
    factors = [LoraFactors(A=torch.randn(r, 16), B=torch.randn(8, r), scale=s) for r, s in ((2, 0.5), (3, 2.0))]
    reference = base(torch.zeros(1, 16))  # the bias alone
    layer = MixedLoRALinear(base, factors, ExpertWeights([2, 3]))
    weights = torch.tensor([[1.0, 0.0], [0.3, 0.7]])
    layer.holder.set(weights)
    x = torch.randn(2, 5, 16)
    expected = torch.stack([
        x[b] @ layer.base.weight + reference[0]
        + sum(w * f.scale * x[b] @ f.A.T @ f.B.T for w, f in zip(weights[b], factors))
        for b in range(2)
    ])
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    layer.merge(torch.tensor([0.3, 0.3, 0.7, 0.7, 0.7]))
    torch.testing.assert_close(layer(x[1:]), expected[1:], rtol=1e-5, atol=1e-5)


def test_layer_dtype_follows_the_base_weight_and_autocast():
    layer, _ = _layer()
    layer.holder.set([0.4, 0.6])
    x = torch.randn(2, 4, 16)
    reference = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference, rtol=0.05, atol=0.1)
    half, _ = _layer(torch.bfloat16)
    assert half.A.dtype == half.B_t.dtype == torch.bfloat16  # the factors follow the base weight's dtype
    half.holder.set([0.4, 0.6])
    assert half(x.bfloat16()).dtype == torch.bfloat16  # a bf16 model takes bf16 inputs, base and experts alike


def test_bf16_base_with_fp32_low_rank_path_matches_the_fp32_sum():
    """A bf16-stored base under autocast with the fp32 low-rank path: the same sum, per example."""
    reference, factors = _layer()
    half, _ = _layer(torch.bfloat16)
    weights = torch.tensor([[1.0, 0.0], [0.3, 0.7], [-0.5, 2.0]])
    reference.holder.set(weights)
    half.holder.set(weights)
    x = torch.randn(3, 5, 16)  # an fp32 residual stream, as in a bf16-stored model under autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = half(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference(x), rtol=0.05, atol=0.15)
    alone = []
    for b in range(3):
        half.holder.set(weights[b])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            alone.append(half(x[b : b + 1]))
    torch.testing.assert_close(torch.cat(alone), out)  # each example alone gives the same rows


def test_apply_mode():
    weights = torch.tensor([[0.05, 0.6, 0.35], [0.3, 0.3, 0.4], [0.34, 0.33, 0.33]])
    assert torch.equal(apply_mode(weights, "soft"), weights)
    assert torch.equal(apply_mode(weights, "top1"), torch.tensor([[0.0, 1, 0], [0, 0, 1], [1, 0, 0]]))
    thresholded = apply_mode(weights, "threshold", floor=0.335)
    torch.testing.assert_close(thresholded, torch.tensor([[0.0, 0.6 / 0.95, 0.35 / 0.95], [0, 0, 1], [1, 0, 0]]))
    torch.testing.assert_close(apply_mode(weights[0], "threshold", floor=0.1), torch.tensor([0.0, 0.6, 0.35]) / 0.95)
    # every entry below the floor: the argmax alone is kept
    assert torch.equal(apply_mode(weights, "threshold", floor=0.7), apply_mode(weights, "top1"))
    with pytest.raises(AlignXError, match="valid modes: soft, top1, threshold"):
        apply_mode(weights, "top2")
