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
