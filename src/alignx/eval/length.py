"""Equal-length pairs: the helpfulness win rate compared at the same length, by construction.

The helpfulness judge (like GPT-4, whose verdicts it learned) prefers the longer answer: on AlpacaEval's
annotations "the longer answer wins" alone agrees with GPT-4 85 % of the time. The evaluation cuts answers at
``eval.max_new_tokens`` (48 in the study), about 194 characters, against references with a median of 380, and
a regression that extrapolates to "equal length" (AlpacaEval 2's length-controlled win rate) is then an
extrapolation: a simulated judge that looks at nothing but length read 0.58–0.62 on it instead of 0.50.

So the headline compares the two texts at the same number of tokens (the run's tokenizer): both are cut to the
shorter one's length, never below ``MIN_TOKENS``. A pure-length judge then reads 0.50 whatever a method's lengths,
and the judge decides on what the first n tokens say. The floor keeps a very short answer (a constant "I'm not
sure.") from being compared with an equally empty fragment of the reference: under ``MIN_TOKENS`` tokens the
answer is judged whole against the reference's first ``MIN_TOKENS`` tokens, so saying next to nothing costs what
it costs with the judge. The win rate against the whole reference is kept beside it (``win_rate``, raw).
"""

from __future__ import annotations

MIN_TOKENS = 16


def token_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def equal_length_pair(tokenizer, response: str, reference: str, min_tokens: int = MIN_TOKENS) -> tuple[str, str]:
    """``(response, reference)`` cut to the same number of tokens: the shorter one's, but at least ``min_tokens``
    (a text shorter than that stays whole)."""
    mine, theirs = token_ids(tokenizer, response), token_ids(tokenizer, reference)
    length = max(min(len(mine), len(theirs)), min_tokens)
    return _cut(tokenizer, response, mine, length), _cut(tokenizer, reference, theirs, length)


def _cut(tokenizer, text: str, ids: list[int], length: int) -> str:
    return text if len(ids) <= length else tokenizer.decode(ids[:length], skip_special_tokens=True).strip()
