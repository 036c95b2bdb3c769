"""A judge behind any OpenAI-compatible chat-completions endpoint: a hosted model, or a local vLLM/llama.cpp.

Each query (see :mod:`alignx.eval.judges.prompts`) is one request at temperature 0 for a single answer token
with its ``top_logprobs``. P(positive) is the probability mass of the positive answer tokens among the
positive and negative ones in that list (yes vs no, m vs M, refusal vs compliance), so a judge's confidence
survives into win rates and calibration. A server that returns no logprobs, or whose top tokens hold no
answer word, is read from its text answer instead: 1.0 or 0.0. An answer that is neither scores 0.5 (no
opinion) and is counted in ``describe()``, so a result file shows how a judge's numbers were read.

We use the ``openai`` client rather than raw HTTP: it is what every OpenAI-compatible server is tested
against, and it already retries 429/5xx and connection errors with exponential backoff and jitter,
honouring ``Retry-After``.
"""

from __future__ import annotations

import math
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any, Sequence

import numpy as np
from tqdm.auto import tqdm

from alignx.errors import AlignXError
from alignx.eval.judges.base import Judge, JudgeItem, JudgeSettings, check_task
from alignx.eval.judges.prompts import PROMPTS, JudgeQuery, score_items

TOP_LOGPROBS = 10  # AlpacaEval asks for 5; more catches spelling variants (" yes", "Yes") of both answers
ACCURACY_NOTE = "not measured here: run `alignx judge validate --judge {spec}` to measure it on held-out labels"


def _import_openai() -> Any:
    try:
        import openai
    except ImportError:
        raise AlignXError(
            "OpenAI-compatible judges need the openai package: pip install 'alignx[online-judges]'"
        ) from None
    return openai


class OpenAIJudge(Judge):
    """``openai:<model>``: the endpoint is ``settings.openai_base_url``, the key ``settings.openai_api_key``."""

    def __init__(
        self,
        model: str,
        task: str,
        settings: JudgeSettings,
        *,
        max_workers: int = 4,
        timeout_s: float = 60.0,
        max_retries: int = 4,
    ):
        self.task = check_task(task)
        self.model = model
        self.spec = f"openai:{model}"
        self.prompt = PROMPTS[task]
        if not settings.openai_base_url:
            raise AlignXError(
                f"judge {self.spec} needs an endpoint: set ALIGNX_JUDGE_BASE_URL (or OPENAI_BASE_URL), "
                "e.g. https://api.openai.com/v1 or http://localhost:8000/v1"
            )
        if not settings.openai_api_key:
            raise AlignXError(
                f"judge {self.spec} needs an API key for {settings.openai_base_url}: set ALIGNX_JUDGE_API_KEY "
                "(or OPENAI_API_KEY); any non-empty value for a local server that checks none"
            )
        self.base_url = settings.openai_base_url
        self.max_workers = max_workers
        self._openai = _import_openai()
        self._api_key = settings.openai_api_key  # kept only to redact it from server messages
        self._client = self._openai.OpenAI(
            base_url=self.base_url, api_key=self._api_key, timeout=timeout_s, max_retries=max_retries
        )
        self.read_from: Counter[str] = Counter()  # logprobs | text | unparsed, over every query scored

    def score(self, items: Sequence[JudgeItem]) -> np.ndarray:
        return score_items(self.prompt, items, self._score_queries)

    def describe(self) -> dict:
        return {
            **super().describe(),
            "backend": "openai-compatible",
            "endpoint": self.base_url,
            "prompt": self.prompt.name,
            "prompt_source": self.prompt.source,
            "probability_read_from": dict(self.read_from),
            "accuracy_note": ACCURACY_NOTE.format(spec=self.spec),
        }

    def _score_queries(self, queries: list[JudgeQuery]) -> np.ndarray:
        """Bounded concurrency; the first error cancels the queries not yet sent."""
        scores = np.empty(len(queries), dtype=np.float64)
        pool = ThreadPoolExecutor(max_workers=self.max_workers, thread_name_prefix="alignx-judge")
        try:
            futures = {pool.submit(self._ask, query): index for index, query in enumerate(queries)}
            for future in tqdm(as_completed(futures), total=len(futures), desc=f"judge {self.spec}", unit="query",
                               disable=None, leave=False, dynamic_ncols=True):
                scores[futures[future]], read_from = future.result()
                self.read_from[read_from] += 1
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        return scores

    def _ask(self, query: JudgeQuery) -> tuple[float, str]:
        """P(positive) and what it was read from."""
        choice = self._request(query).choices[0]
        probability = _from_logprobs(query, choice.logprobs)
        if probability is not None:
            return probability, "logprobs"
        verdict = query.classify(choice.message.content or "")
        return (0.5, "unparsed") if verdict is None else (float(verdict), "text")

    def _request(self, query: JudgeQuery) -> Any:
        openai = self._openai
        try:
            return self._client.chat.completions.create(
                model=self.model, messages=query.messages(), temperature=0, max_tokens=1,
                logprobs=True, top_logprobs=TOP_LOGPROBS,
            )
        except openai.AuthenticationError:
            raise AlignXError(
                f"the judge endpoint {self.base_url} rejected the API key (HTTP 401): check ALIGNX_JUDGE_API_KEY"
            ) from None
        except openai.APIStatusError as exc:
            detail = (str(exc.message).strip().splitlines() or [""])[0].replace(self._api_key, "***")
            raise AlignXError(
                f"the judge endpoint {self.base_url} answered HTTP {exc.status_code} for model {self.model!r}: {detail}"
            ) from None
        except openai.APIConnectionError as exc:
            why = "timed out" if isinstance(exc, openai.APITimeoutError) else "connection failed"
            raise AlignXError(
                f"cannot reach the judge endpoint {self.base_url} ({why}): is the server running and the URL right?"
            ) from None


def _from_logprobs(query: JudgeQuery, logprobs: Any) -> float | None:
    """P(positive) among the answer tokens of the first position's top_logprobs; None if it holds none."""
    if logprobs is None or not logprobs.content:
        return None
    mass = {True: 0.0, False: 0.0}
    for candidate in logprobs.content[0].top_logprobs or []:
        verdict = query.classify(candidate.token)
        if verdict is not None:
            mass[verdict] += math.exp(candidate.logprob)
    total = mass[True] + mass[False]
    return mass[True] / total if total > 0 else None
