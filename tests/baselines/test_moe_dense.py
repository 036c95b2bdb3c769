"""moe-dense: three dense expert FFNs per layer with a top-2 token router (H3Fusion/TrinityX-style)."""

import json
import math
import shutil

import pytest
import torch
from conftest import assert_close_at_scale

from alignx.axes import AXES
from alignx.baselines import moe_dense
from alignx.baselines.moe_dense import DenseMoE, DenseMoEMLP, balance_loss, real_token_mask
from alignx.errors import AlignXError
from alignx.generate import AlignX
from alignx.run import RunDir, load_safetensors


@pytest.fixture(scope="module")
def run(tiny_stage1_run, tmp_path_factory):
    """A private copy of the finished tiny Stage 1 run (the shared one must not gain a moe-dense)."""
    target = tmp_path_factory.mktemp("moe-dense") / "run"
    shutil.copytree(tiny_stage1_run.run_dir, target, ignore=shutil.ignore_patterns("run.lock"))
    return RunDir(target)


def _base(run):
    from alignx.config import load_config
    from alignx.models.loading import load_base_model

    return load_base_model(load_config(run.config_path).model).model


@pytest.fixture(scope="module")
def built(run):
    base = _base(run)
    moe = DenseMoE.build(_base(run), {axis: run.adapter_dir(axis) for axis in AXES}, seed=0)
    return base, moe


def _merged_expert_mlp(run, axis, layer):
    """Reference: PEFT's own merge of the axis adapter into a fresh base, that layer's MLP."""
    from peft import PeftModel

    from alignx.models.layers import decoder_layers

    merged = PeftModel.from_pretrained(_base(run), run.adapter_dir(axis)).merge_and_unload()
    return decoder_layers(merged)[layer].mlp


@pytest.mark.parametrize("expert", [0, 2])
def test_a_router_forced_to_one_expert_gives_that_experts_merged_mlp(run, built, expert):
    _, moe = built
    layer = moe.layers[1]
    hidden = layer.router.shape[1]
    x = torch.randn(2, 5, hidden, generator=torch.Generator().manual_seed(1))
    x[..., 0] = 1.0
    saved = layer.router.detach().clone()
    try:
        with torch.no_grad():
            layer.router.zero_()
            layer.router[expert, 0] = 100.0  # logit 100 for `expert` on every token: its renormalised gate is ~1
            _, top_i, gates = layer.route(x.reshape(-1, hidden))
            assert (top_i[:, 0] == expert).all() and torch.allclose(gates[:, 0], torch.ones(10))
            out = layer(x)
            reference = _merged_expert_mlp(run, AXES[expert], 1)(x)
            other = _merged_expert_mlp(run, AXES[(expert + 1) % 3], 1)(x)
    finally:
        with torch.no_grad():
            layer.router.copy_(saved)
    assert (reference - other).abs().max() > 1e-5  # the experts really differ, so the check below can fail
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-6)


def test_sparse_dispatch_equals_dense_top2_mixture(built):
    _, moe = built
    layer = moe.layers[0]
    x = torch.randn(3, 7, layer.router.shape[1], generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = layer(x)
        probs = torch.softmax(x @ layer.router.T, dim=-1)
        top_p, top_i = probs.topk(2, dim=-1)
        gates = torch.zeros_like(probs).scatter(-1, top_i, top_p / top_p.sum(-1, keepdim=True))
        dense = sum(gates[..., e : e + 1] * expert(x) for e, expert in enumerate(layer.experts))
    assert len(set(top_i[..., 0].flatten().tolist())) > 1  # the random router does use several experts
    torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-6)


def test_every_layer_holds_three_dense_ffn_copies(built):
    from alignx.models.layers import decoder_layers

    base, moe = built
    base_mlps = [block.mlp for block in decoder_layers(base)]
    mlp_params = sum(p.numel() for p in base_mlps[0].parameters())
    assert len(moe.layers) == len(base_mlps) == 3
    for block, layer in zip(decoder_layers(moe.model), moe.layers):
        assert block.mlp is layer and isinstance(layer, DenseMoEMLP)
        assert sum(p.numel() for p in layer.experts.parameters()) == 3 * mlp_params
        pointers = {p.data_ptr() for p in layer.experts.parameters()}
        assert len(pointers) == len(list(layer.experts.parameters()))  # no shared storage: real copies
    routers = sum(layer.router.numel() for layer in moe.layers)
    base_total = sum(p.numel() for p in base.parameters())
    assert sum(p.numel() for p in moe.model.parameters()) == base_total + 2 * 3 * mlp_params + routers
    assert moe.info["mlp_modules"] == ["down_proj", "gate_proj", "up_proj"]


def test_attention_gets_the_mean_of_the_experts_deltas(run, built):
    from alignx.stage1.task_vector import task_vector

    base, moe = built
    key = "model.layers.2.self_attn.q_proj.weight"
    mean = sum(task_vector(run.adapter_dir(axis))[key] for axis in AXES) / 3
    assert mean.abs().max() > 1e-6
    assert_close_at_scale(moe.model.state_dict()[key], base.state_dict()[key] + mean)


def test_load_balancing_loss_and_padding_mask():
    uniform = torch.full((6, 3), 1 / 3)
    spread = torch.tensor([[0, 1], [1, 2], [2, 0]] * 2)
    assert balance_loss(uniform, spread, 3).item() == pytest.approx(1.0)
    collapsed = torch.tensor([[1.0, 0.0, 0.0]] * 6)
    assert balance_loss(collapsed, torch.tensor([[0, 1]] * 6), 3).item() == pytest.approx(1.5)
    mask = real_token_mask(torch.tensor([[5, 6, 9, 9], [5, 9, 6, 7]]), pad_id=9)
    assert mask.tolist() == [[True, True, False, False], [True, True, True, True]]


@pytest.fixture(scope="module")
def trained(run):
    """Train moe-dense through `alignx baseline`, keeping the model it trained and its weights before."""
    from alignx.cli import main

    with pytest.raises(AlignXError, match="unknown method 'moe-dense'"):
        AlignX.from_run(run.root, method="moe-dense")
    captured = {}
    original = moe_dense.build_dense_moe

    def capture(*args, **kwargs):
        moe = original(*args, **kwargs)
        captured["moe"] = moe
        captured["before"] = {k: v.detach().clone() for k, v in moe.model.state_dict().items()}
        return moe

    moe_dense.build_dense_moe = capture
    try:
        assert main(["baseline", "--run", str(run.root), "--method", "moe-dense"]) == 0
    finally:
        moe_dense.build_dense_moe = original
    return captured


def test_training_changes_only_the_routers_for_the_experts_budget(run, trained, capsys):
    from alignx.cli import main

    moe, before = trained["moe"], trained["before"]
    after = moe.model.state_dict()
    routers = {k for k in after if k.endswith(".router")}
    assert len(routers) == 3
    for key, value in after.items():
        if key in routers:
            assert not torch.equal(value, before[key]), f"{key} did not train"
        else:
            assert torch.equal(value, before[key]), f"{key} changed but only the routers may train"
    log = [json.loads(line) for line in run.train_log_path("moe-dense").read_text().splitlines()]
    budget = sum(json.loads(run.summary_path(axis).read_text())["steps"] for axis in AXES)
    assert len(log) == budget == 3
    assert all(math.isfinite(row["loss"]) and math.isfinite(row["aux_loss"]) and row["aux_loss"] > 0 for row in log)
    saved, _ = load_safetensors(moe_dense.routers_path(run))
    for i, layer in enumerate(moe.layers):
        assert torch.equal(saved[f"layers.{i}.router"], layer.router.detach())
    info = json.loads(moe_dense.config_path(run).read_text())
    assert info["experts"] == list(AXES) and info["top_k"] == 2 and info["aux_loss_coef"] == 0.01
    assert main(["baseline", "--run", str(run.root), "--method", "moe-dense"]) == 0
    assert "already trained" in capsys.readouterr().out


def test_generate_with_moe_dense(run, trained, capsys):
    from alignx.cli import main

    aligner = AlignX.from_run(run.root, method="moe-dense")
    assert aligner.mixture is None and len(aligner.dense.layers) == 3
    for trained_layer, loaded_layer in zip(trained["moe"].layers, aligner.dense.layers):
        assert torch.equal(trained_layer.router.detach(), loaded_layer.router.detach())
    results = aligner.generate(["How do I stay healthy?", "Hi"], max_new_tokens=3)
    assert [r.method for r in results] == ["moe-dense"] * 2 and all(r.weights is None for r in results)
    assert main(["generate", "--run", str(run.root), "--method", "moe-dense", "--prompt", "Hi", "--max-new-tokens", "2"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["method"] == "moe-dense" and "weights" not in row and isinstance(row["response"], str)
