"""MoCaE on synthetic feature banks: routing, calibration, ablations, persistence."""

import dataclasses
import json

import pytest
import torch

from alignx.config import Stage2Config
from alignx.stage2.mocae import MoCaE
from alignx.stage2.train import build_model, calibration_nll, fit_head, train_mocae

LAYERS = (1, 2)
MAX_LENGTH = 64


def _bank(n_per_axis: int, seed: int, spread: float = 1.0):
    """Three Gaussian clusters in a 24-d 'router' space; the 'calibrator' space is a noisy linear view of it."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.zeros(3, 24)
    centres[0, 0] = centres[1, 1] = centres[2, 2] = 4.0
    labels = torch.arange(3).repeat_interleave(n_per_axis)
    router = centres[labels] + spread * torch.randn(len(labels), 24, generator=g)
    mixing = torch.randn(24, 16, generator=torch.Generator().manual_seed(99))
    calibrator = router @ mixing + 0.1 * torch.randn(len(labels), 16, generator=g)
    return router, calibrator, labels


def _config(**changes):
    return dataclasses.replace(Stage2Config(latent_dim=8, router_hidden=64, max_epochs=15, patience=3, base_axes=[]), **changes)


def _trained(config, spread=1.0):
    router, calibrator, labels = _bank(120, seed=0, spread=spread)
    model, train = build_model(config, router, calibrator, labels, LAYERS, MAX_LENGTH)
    cal_router, cal_calibrator, cal_labels = _bank(40, seed=1, spread=spread)
    calibration = model.data_for(cal_router, cal_calibrator, cal_labels)
    train_mocae(model, train, calibration, config, log=lambda *_: None)
    if config.output_calibration:
        with torch.no_grad():
            parts = model.parts(calibration)
        fit_head(model, parts, calibration.labels)
    return model, calibration


def test_routing_on_three_clusters_is_near_perfect():
    model, _ = _trained(_config())
    router, calibrator, labels = _bank(50, seed=2)
    routing = model.route(router, calibrator)
    assert (routing.calibrated.argmax(1) == labels).float().mean() > 0.98
    assert torch.allclose(routing.weights.sum(1), torch.ones(len(labels)))
    assert routing.ood.float().mean() < 0.1
    for name in ("router", "fractal", "natural", "typicality"):
        assert getattr(routing, name).shape == (150, 3)


def test_the_experts_are_mixed_with_weights_made_from_the_probabilities_which_stay_calibrated():
    model, _ = _trained(_config())
    router, calibrator, labels = _bank(50, seed=2, spread=2.5)
    soft = model.route(router, calibrator)
    model.config = dataclasses.replace(model.config, mixing="top1", base_axes=["helpful"])
    sharp = model.route(router, calibrator)
    assert torch.equal(sharp.calibrated, soft.calibrated)  # --explain, the metrics and the gate read the same p
    assert torch.equal(soft.weights[~soft.ood], soft.calibrated[~soft.ood])
    routed = ~sharp.ood
    top = sharp.calibrated[routed].argmax(1)
    expected = torch.nn.functional.one_hot(top, 3).float() * (top != 0).float()[:, None]  # helpful -> base model
    assert torch.equal(sharp.weights[routed], expected)


def test_output_temperature_lowers_calibration_nll():
    model, calibration = _trained(_config(), spread=2.5)  # overlapping clusters: calibration matters
    before = calibration_nll(model, calibration, calibrated=False)
    after = calibration_nll(model, calibration, calibrated=True)
    assert model.head.temperature != pytest.approx(1.0)
    assert after < before


def test_uncalibrated_variant_is_the_router_alone():
    model, calibration = _trained(_config(use_fractal=False, use_natural=False, output_calibration=False))
    assert model.fractal is None and model.natural is None
    with torch.no_grad():
        assert torch.allclose(model(calibration).exp(), model.router.log_probs(calibration.h).exp())


def test_off_manifold_prompts_fall_back(tmp_path):
    model, _ = _trained(_config(ood_fallback="base"))
    far = torch.randn(20, 24, generator=torch.Generator().manual_seed(3)) * 3 + 40.0
    routing = model.route(far, far @ torch.randn(24, 16, generator=torch.Generator().manual_seed(99)))
    assert routing.ood.all() and torch.equal(routing.weights, torch.zeros(20, 3))  # base model: experts off


@pytest.mark.parametrize("changes", [{}, {"combination": "pooled", "output_head": "dirichlet", "adaptive_temperature": True},
                                     {"mixing": "top1", "base_axes": ["helpful"]}])
def test_save_and_load_route_identically(tmp_path, changes):
    model, _ = _trained(_config(**changes))
    model.save(tmp_path)
    loaded = MoCaE.load(tmp_path)
    router, calibrator, _ = _bank(10, seed=4)
    a, b = model.route(router, calibrator), loaded.route(router, calibrator)
    assert torch.allclose(a.weights, b.weights, atol=1e-6) and torch.equal(a.ood, b.ood)
    assert loaded.layers == LAYERS and loaded.max_length == MAX_LENGTH


def test_a_pooled_router_trains_on_log_p_alone_whatever_the_calibrators():
    """The benchmark shares one trunk between every variant whose router trains alone (crossfit.trunk_of)."""
    routers = [_trained(_config(**changes))[0].router.state_dict() for changes in (
        {"combination": "pooled"}, {"combination": "pooled", "use_natural": False},
        {"use_fractal": False, "use_natural": False})]
    for other in routers[1:]:
        assert all(torch.equal(routers[0][k], other[k]) for k in routers[0])


def test_pooled_head_fits_exponents_and_beats_the_router_alone_when_the_calibrators_know_more():
    model, calibration = _trained(_config(combination="pooled"), spread=2.5)
    assert model.head.terms == ("fractal", "natural")
    assert calibration_nll(model, calibration, calibrated=True) < calibration_nll(model, calibration, calibrated=False)
    assert model.head.exponents.abs().sum() > 0


def test_a_zero_lambda_keeps_a_calibrator_out_of_the_pooled_head():
    model, _ = _trained(_config(combination="pooled", lambda_fractal=0.0))
    assert model.head.terms == ("natural",) and model.fractal is not None  # the fractal calibrator still gates


def test_an_adaptive_temperature_over_the_router_alone_keeps_the_routers_decision():
    model, calibration = _trained(_config(combination="pooled", lambda_fractal=0.0, lambda_natural=0.0,
                                          adaptive_temperature=True), spread=2.5)
    assert model.head.terms == () and model.head.signals == ("typicality", "fractal", "natural")
    with torch.no_grad():
        assert torch.equal(model(calibration).argmax(1), model.router.log_probs(calibration.h).argmax(1))


def test_a_router_saved_before_mixing_weights_existed_mixes_soft(tmp_path):
    model, _ = _trained(_config(mixing="top1"))
    model.save(tmp_path)
    meta = json.loads((tmp_path / "mocae.json").read_text())
    for key in ("mixing", "mixing_power", "base_axes"):
        del meta["stage2"][key]
    (tmp_path / "mocae.json").write_text(json.dumps(meta))
    assert MoCaE.load(tmp_path).config.mixing == "soft"  # what it was trained and evaluated with
