"""The helpfulness recipes compared before choosing :data:`alignx.eval.judges.offline.RECIPES`' one, each measured
by the validation the stored judge gets (:func:`alignx.eval.judges.offline.validate`): the worst system-level
win-rate error over every held-out check, a held-out system against the evaluation's reference and against a
reference set the judge was not fit on, and the same on pairs cut to the evaluation's budget.

    python -m alignx.eval.judges.candidates [--data-dir ../shared/data] [--only NAME,...]

prints one ``<name> worst=… same_reference=… new_reference=… cut36=… accuracy_loo=…`` line per candidate
(docs/evaluation.md has the table). Embeddings come from the judges' cache, so a second run encodes nothing.
The candidates were fixed from the judge data alone; no AlignX answer was read to choose among them.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from alignx.eval.judges import offline
from alignx.eval.judges.base import JudgeItem, JudgeSettings
from alignx.eval.judges.data import cut_to_words, judge_data
from alignx.eval.judges.encoder import TextEncoder
from alignx.eval.judges.features import REFUSAL_PHRASES, answer_side, pair_difference, phrase_rates, text_shape, text_style

BRADLEY_TERRY = offline.Recipe("", "pair_difference", "bradley_terry")


@dataclass(frozen=True)
class Candidate:
    """A recipe stand-in: how pairs become features, and how a model is fit on them (P(response wins) out)."""

    description: str
    featurize: Callable[[Sequence[JudgeItem], TextEncoder], np.ndarray]
    fit: Callable[[np.ndarray, np.ndarray], object] = BRADLEY_TERRY.fit


class _Symmetrised:
    """P(a beats b) averaged with 1 - P(b beats a) for an estimator fit on pairs both ways (features a - b)."""

    def __init__(self, model):
        self.model = model

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        p = 0.5 * (self.model.predict_proba(x)[:, 1] + 1 - self.model.predict_proba(-x)[:, 1])
        return np.column_stack([1 - p, p])


def symmetric_boosting(features: np.ndarray, labels: np.ndarray):
    model = HistGradientBoostingClassifier(max_iter=200, learning_rate=0.05, max_depth=3, random_state=0)
    with threadpool_limits(1):
        model.fit(np.vstack([features, -features]), np.concatenate([labels, ~np.asarray(labels, bool)]))
    return _Symmetrised(model)


def one_sided_boosting(features: np.ndarray, labels: np.ndarray):  # the previous release's estimator
    with threadpool_limits(1):
        return HistGradientBoostingClassifier(max_iter=300, learning_rate=0.1, max_depth=3, random_state=0).fit(features, labels)


def l1_bradley_terry(features: np.ndarray, labels: np.ndarray):
    model = make_pipeline(StandardScaler(with_mean=False),
                          LogisticRegression(C=0.05, l1_ratio=1.0, solver="liblinear", fit_intercept=False, max_iter=5000))
    with threadpool_limits(1):
        return model.fit(np.vstack([features, -features]), np.concatenate([labels, ~np.asarray(labels, bool)]))


class _Platt:
    def __init__(self, margin_model, platt):
        self.margin_model, self.platt = margin_model, platt

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return self.platt.predict_proba(self.margin_model.decision_function(x)[:, None])


def platt_bradley_terry(features: np.ndarray, labels: np.ndarray):
    """Bradley-Terry's margin, then a sigmoid with an intercept fit on the pairs as annotated (response vs
    reference): a calibrated probability whose 0.5 point may move off margin 0."""
    model = BRADLEY_TERRY.fit(features, labels)
    with threadpool_limits(1):
        platt = LogisticRegression(C=1e4).fit(model.decision_function(features)[:, None], labels)
    return _Platt(model, platt)


def _length_only(items, encoder):
    return np.array([[np.log1p(len(it.response.split())) - np.log1p(len((it.reference or "").split()))] for it in items])


def _no_length_cues(items, encoder):
    """Differences of cues that do not grow with length: refusal opening, word variety, ends a sentence, word
    length, holds a digit, words per sentence, phrase rates, cosine to the instruction, list items and lines per
    100 words."""
    prompts = encoder.encode([it.prompt for it in items])

    def side(texts):
        shape, style, words = text_shape(texts), text_style(texts), np.array([max(len(t.split()), 1) for t in texts], float)[:, None]
        lines = np.array([max(len(t.splitlines()), 1) for t in texts], float)[:, None]
        cosine = np.sum(encoder.encode(texts) * prompts, 1, keepdims=True)
        return np.hstack([shape[:, 4:5], style[:, [0, 1, 3, 5, 7]], phrase_rates(texts, REFUSAL_PHRASES), cosine,
                          np.log1p(np.expm1(shape[:, 3:4]) / words * 100), np.log1p(lines / words * 100)])

    return side([it.response for it in items]) - side([it.reference or "" for it in items])


def _first_words(n: int):
    def build(items, encoder):
        return pair_difference([replace(it, response=cut_to_words(it.response, n), reference=cut_to_words(it.reference or "", n))
                                for it in items], encoder, phrases="rates", length_interactions=False)
    return build


def _with_embedding(items, encoder):
    responses, references = encoder.encode([it.response for it in items]), encoder.encode([it.reference or "" for it in items])
    return np.hstack([pair_difference(items, encoder, phrases="rates", length_interactions=False), responses - references])


def _both_sides(items, encoder):
    """The previous release's features: each side's shape, refusal phrase counts and cosine to the instruction,
    their differences, and the two answers' cosine."""
    prompts = encoder.encode([it.prompt for it in items])
    responses, references = [it.response for it in items], [it.reference or "" for it in items]
    vectors, reference_vectors = encoder.encode(responses), encoder.encode(references)
    keep = np.r_[0:5, 13:13 + len(REFUSAL_PHRASES) + 1]  # answer_side without its style block

    def side(texts, v):
        return answer_side(texts, v, prompts, "counts")[:, keep]

    a, b = side(responses, vectors), side(references, reference_vectors)
    return np.hstack([a, b, a - b, np.sum(vectors * reference_vectors, 1, keepdims=True)])


def _pairs(phrases: str, length_interactions: bool):
    return lambda items, encoder: pair_difference(items, encoder, phrases=phrases, length_interactions=length_interactions)


CANDIDATES: dict[str, Candidate] = {
    "v2": Candidate("Bradley-Terry on differences of shape, style, log refusal-phrase counts, cosine to the "
                    "instruction (the judge before this one)", _pairs("counts", False)),
    "length-only": Candidate("Bradley-Terry on the log word-count difference alone", _length_only),
    "no-length-cues": Candidate("Bradley-Terry on differences of cues that do not grow with length only", _no_length_cues),
    "phrase-rates": Candidate("v2 with refusal phrases per 100 words instead of counts", _pairs("rates", False)),
    "length-interactions": Candidate("v2 plus each length difference times the pair's total", _pairs("counts", True)),
    "rates+interactions": Candidate("phrase rates and length interactions (chosen)", _pairs("rates", True)),
    "first-200-words": Candidate("phrase rates, each answer read to its 200th word only", _first_words(200)),
    "first-100-words": Candidate("phrase rates, each answer read to its 100th word only", _first_words(100)),
    "embedding": Candidate("phrase rates plus the MiniLM embedding difference", _with_embedding),
    "l1": Candidate("phrase rates, L1-penalised Bradley-Terry (fewer cues)", _pairs("rates", False), l1_bradley_terry),
    "platt": Candidate("phrase rates, Bradley-Terry margin Platt-calibrated on the pairs as annotated (an intercept)",
                       _pairs("rates", False), platt_bradley_terry),
    "symmetric-boosting": Candidate("gradient boosting on the phrase-rate differences, pairs both ways, averaged over "
                                    "both orders", _pairs("rates", False), symmetric_boosting),
    "previous-release": Candidate("gradient boosting (depth 3) on both answers' shape, phrase counts and cosine, their "
                                  "differences and mutual cosine (the release before the Bradley-Terry judge)",
                                  _both_sides, one_sided_boosting),
}


@contextmanager
def as_helpfulness_recipe(candidate: Candidate):
    """``candidate`` stands in for the helpfulness recipe while the block runs."""
    saved = offline.RECIPES["helpfulness"]
    offline.RECIPES["helpfulness"] = candidate  # type: ignore[assignment]  # duck-typed: featurize and fit
    try:
        yield
    finally:
        offline.RECIPES["helpfulness"] = saved


def measure(candidate: Candidate, settings: JudgeSettings, encoder_spec: str | None = None) -> dict[str, float]:
    """The candidate's validation figures: worst win-rate errors (points) and held-out accuracies. ``encoder_spec``
    replaces MiniLM (tests use a hashing encoder)."""
    data = judge_data("helpfulness", settings)
    encoder = offline.make_encoder(encoder_spec or offline.RECIPES["helpfulness"].encoder, settings)
    with as_helpfulness_recipe(candidate):
        features, cut = offline.featurize("helpfulness", data, encoder)
        validation, _ = offline.validate("helpfulness", data, features, cut_features=cut)
    return {**validation.points, **validation.accuracy}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", help="judge data laid out like shared/data (default: $ALIGNX_DATA_DIR)")
    parser.add_argument("--judges-dir", help="where the embedding cache lives (default: <alignx cache>/judges)")
    parser.add_argument("--only", help="comma-separated candidate names (default: all)")
    args = parser.parse_args(argv)
    settings = JudgeSettings(judges_dir=Path(args.judges_dir) if args.judges_dir else None,
                             data_dir=Path(args.data_dir) if args.data_dir else None)
    names = args.only.split(",") if args.only else list(CANDIDATES)
    for name in names:
        figures = measure(CANDIDATES[name], settings)
        print(f"{name} worst={figures['helpfulness_wr_error']:.1f} same_reference={figures['helpfulness_wr_error_same_reference']:.1f} "
              f"new_reference={figures['helpfulness_wr_error_new_reference']:.1f} cut36={figures['helpfulness_cut36_wr_error']:.1f} "
              f"accuracy_loo={figures['helpfulness_loo']:.3f} accuracy_new_reference={figures['helpfulness_new_reference']:.3f}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
