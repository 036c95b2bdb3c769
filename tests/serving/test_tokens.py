"""The length bound that refuses a huge prompt without tokenizing it never refuses one that fits."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from alignx.serving.tokens import PromptCounter


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1, max_size=400))
def test_a_prompt_the_bound_refuses_has_more_tokens_than_the_limit(tiny_tokenizer, text):
    counter = PromptCounter(tiny_tokenizer)
    assert counter.fits(text, counter.count(text))  # with a limit of its own length in tokens, a prompt fits


def test_the_bound_is_the_longest_vocabulary_entry(tiny_tokenizer):
    counter = PromptCounter(tiny_tokenizer)
    assert counter.max_token_bytes == max(len(t.encode()) for t in tiny_tokenizer.get_vocab())
    assert counter.fits("a" * counter.max_token_bytes * 3, 3) and not counter.fits("a" * (counter.max_token_bytes * 3 + 1), 3)
