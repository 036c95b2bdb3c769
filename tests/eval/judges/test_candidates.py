"""The helpfulness candidates measured by the stored judge's own validation (docs/evaluation.md's table)."""

from __future__ import annotations

import numpy as np

from alignx.eval.judges import JudgeSettings
from alignx.eval.judges.candidates import CANDIDATES, measure
from alignx.eval.judges.data import judge_data
from alignx.eval.judges.offline import RECIPES, make_encoder

from .test_offline import ENCODER, tiny_judge_data  # noqa: F401  (the fixture, shared)


def test_the_chosen_candidate_is_the_stored_recipe(tiny_judge_data, tmp_path):
    settings = JudgeSettings(judges_dir=tmp_path, data_dir=tiny_judge_data)
    items = judge_data("helpfulness", settings).items[:40]
    encoder = make_encoder(ENCODER, settings)
    chosen = [name for name, candidate in CANDIDATES.items() if "(chosen)" in candidate.description]
    assert chosen == ["rates+interactions"]
    np.testing.assert_array_equal(CANDIDATES["rates+interactions"].featurize(items, encoder), RECIPES["helpfulness"].featurize(items, encoder))


def test_measure_gives_the_figures_a_candidate_is_chosen_by_and_restores_the_recipe(tiny_judge_data, tmp_path):
    settings = JudgeSettings(judges_dir=tmp_path, data_dir=tiny_judge_data)
    recipe = RECIPES["helpfulness"]
    figures = measure(CANDIDATES["length-only"], settings, ENCODER)
    assert RECIPES["helpfulness"] is recipe
    checks = [v for k, v in figures.items() if k.startswith("helpfulness_wr_error_") and not k.endswith("_reference")]
    assert figures["helpfulness_wr_error"] == max(abs(v) for v in checks) >= figures["helpfulness_wr_error_same_reference"]
    assert 0 <= figures["helpfulness_new_reference"] <= 1
