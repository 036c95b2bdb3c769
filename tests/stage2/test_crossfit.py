"""Source-group folds for the shift-aware output calibration."""

import torch

from alignx.config import DataConfig
from alignx.data.splits import Example
from alignx.stage2.crossfit import FOLDS, _balanced, bank_folds


def _examples(axis, sources):
    return [Example(axis, f"prompt {i}", "", "answer", source, id=f"{source}:{i}") for i, source in enumerate(sources)]


def test_harmless_folds_follow_the_data_sets():
    sources = ["safety_tuned_llamas"] * 4 + ["hh_rlhf_harmless"] * 3 + ["beavertails"] * 2
    examples = _examples("harmless", sources)
    folds = bank_folds("harmless", examples, [e.user_text for e in examples], torch.randn(9, 4), DataConfig(), 0)
    by_source = {}
    for source, fold in zip(sources, folds.tolist()):
        by_source.setdefault(source, set()).add(fold)
    assert all(len(f) == 1 for f in by_source.values())  # a data set never spans two folds
    assert len({next(iter(f)) for f in by_source.values()}) == 3


def test_single_source_axes_fold_by_feature_clusters():
    generator = torch.Generator().manual_seed(0)
    centres = torch.tensor([[8.0, 0], [0, 8.0], [-8.0, -8.0]])
    features = torch.cat([c + torch.randn(20, 2, generator=generator) for c in centres])
    examples = _examples("helpful", ["alpaca"] * 60)
    folds = bank_folds("helpful", examples, [e.user_text for e in examples], features, DataConfig(), 0)
    assert set(folds.tolist()) == set(range(FOLDS))
    for c in range(3):  # each topic region lands in one fold
        assert len(set(folds[c * 20 : (c + 1) * 20].tolist())) == 1


def test_groups_are_balanced_whole():
    groups = ["a"] * 5 + ["b"] * 4 + ["c"] * 3 + ["d"] * 2 + ["e"] * 1
    folds = _balanced(groups).tolist()
    for g in set(groups):
        assert len({f for f, x in zip(folds, groups) if x == g}) == 1
    sizes = sorted(folds.count(k) for k in range(FOLDS))
    assert sizes == [5, 5, 5]


def test_fold_models_early_stop_outside_the_fold_they_leave_out(monkeypatch):
    from alignx.config import Stage2Config
    from alignx.stage2 import crossfit
    from alignx.stage2.train import BankRows

    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(3).repeat_interleave(60)
    router = torch.eye(3, 8)[labels] * 3 + torch.randn(180, 8, generator=generator)
    rows = BankRows(router, router @ torch.randn(8, 6, generator=generator), labels,
                    calibration=torch.arange(180) % 5 == 0, folds=torch.arange(180) % FOLDS)
    stopping_sets = []

    def spy(model, data, calibration, config, log=print):
        stopping_sets.append(calibration.h.shape[0])  # train nothing: only what it stops on matters here
        return []

    monkeypatch.setattr(crossfit, "train_mocae", spy)
    masks = []
    real_data = BankRows.data
    monkeypatch.setattr(BankRows, "data", lambda self, model, mask: masks.append(mask.clone()) or real_data(self, model, mask))
    config = Stage2Config(latent_dim=4, router_hidden=16, max_epochs=1)
    parts = crossfit.out_of_fold_parts(config, rows, (1, 2), 64, log=lambda *_: None)
    assert parts is not None and parts.router.shape == parts.fractal.shape == (int((~rows.calibration).sum()), 3)
    stopping = masks[0::2]  # per fold: the early-stopping rows, then the rows it predicts
    predicted = masks[1::2]
    for k, (stop, unseen) in enumerate(zip(stopping, predicted)):
        assert stop.any() and not (stop & (rows.folds == k)).any()  # no row of the left-out sources
        assert (stop <= rows.calibration).all() and torch.equal(unseen, ~rows.calibration & (rows.folds == k))
    assert stopping_sets == [int(s.sum()) for s in stopping]


def test_nested_selection_never_fits_on_the_groups_it_scores(monkeypatch):
    from alignx.config import Stage2Config
    from alignx.stage2 import crossfit
    from alignx.stage2.train import BankRows

    generator = torch.Generator().manual_seed(1)
    labels = torch.arange(3).repeat_interleave(90)
    folds = torch.arange(270) % FOLDS
    router = torch.eye(3, 8)[labels] * 2.5 + torch.randn(270, 8, generator=generator)
    router[folds == 2] += 1.0  # one source group sits elsewhere: the shift the folds imitate
    row_id = torch.arange(270, dtype=torch.float32)  # a feature column that names each row
    rows = BankRows(torch.cat([router, row_id[:, None] * 1e-6], 1), router @ torch.randn(8, 6, generator=generator),
                    labels, calibration=torch.arange(270) % 7 == 0, folds=folds)
    fitted_on = []
    real_build = crossfit.build_model

    def spy(config, train_router, *args):
        fitted_on.append(set(torch.round(train_router[:, -1] * 1e6).long().tolist()))
        return real_build(config, train_router, *args)

    monkeypatch.setattr(crossfit, "build_model", spy)
    scores = crossfit.nested_calibration_scores(Stage2Config(latent_dim=4, router_hidden=16, max_epochs=3), rows, (1, 2), 64,
                                                log=lambda *_: None)
    assert set(scores) == set(crossfit.CANDIDATES)
    assert all(s["nll"] > 0 and 0 <= s["ece"] <= 1 for s in scores.values())
    # per outer fold: its router, then the inner cross-fit's two fold models; none saw a row of the scored fold
    assert len(fitted_on) == FOLDS * 3
    for k in range(FOLDS):
        scored = set(torch.nonzero(folds == k).flatten().tolist())
        assert all(not (seen & scored) for seen in fitted_on[3 * k : 3 * k + 3])
