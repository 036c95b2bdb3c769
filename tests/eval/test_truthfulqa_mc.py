"""TruthfulQA MC1/MC2 scoring: hand-computed cases and the batched log-likelihood against one row at a time."""

import contextlib
import math

import pytest
import torch

from alignx.eval.truthfulqa_mc import QA_PRIMER, continuation_logprobs, mc_context, mc_scores


def test_mc_scores_by_hand():
    # MC1: the correct (first) choice is not the most likely -> 0; MC2: mass on the true ones
    scores = mc_scores([-3.0, -1.0], [1, 0], [-1.0, -2.0, -3.0], [1, 1, 0])
    assert scores["mc1"] == 0.0
    p = [math.exp(-1), math.exp(-2), math.exp(-3)]
    assert scores["mc2"] == pytest.approx((p[0] + p[1]) / sum(p))
    assert mc_scores([-0.5, -1.0], [1, 0], [-900.0, -901.0], [1, 0])["mc1"] == 1.0
    # very negative log-likelihoods must not underflow to 0/0
    assert mc_scores([-0.5, -1.0], [1, 0], [-900.0, -901.0], [1, 0])["mc2"] == pytest.approx(1 / (1 + math.exp(-1)))


def test_context_is_lm_eval_format():
    context = mc_context("Is the sky green?")
    assert context.startswith(QA_PRIMER) and context.endswith("\n\nQ: Is the sky green?\nA:")
    assert QA_PRIMER.count("Q: ") == 6


def test_batched_logprobs_equal_one_row_at_a_time(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    context = "Q: What is red?\nA:"
    choices = [" A colour.", " Nothing at all, really, it is a long answer.", " Red."]
    batched = continuation_logprobs(model, tokenizer, context, choices)
    for choice, value in zip(choices, batched):
        ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
        whole = tokenizer(context + choice, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([whole])).logits.float().log_softmax(-1)[0]
        expected = sum(float(logits[i - 1, whole[i]]) for i in range(len(ctx), len(whole)))
        assert value == pytest.approx(expected, abs=1e-4)


def test_the_primers_cache_gives_the_same_scores(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignx.eval.truthfulqa_mc import PrefixCache, continuation_scores, primer_cache

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    shared = primer_cache(model, tokenizer)
    choices = [" A colour.", " Nothing at all, really.", " Red."]
    for question in ("What is red?", "Is the sky green?"):  # the cache is copied, never consumed
        assert tokenizer(mc_context(question), add_special_tokens=False)["input_ids"][: len(shared.ids)] == shared.ids
        plain = continuation_scores(model, tokenizer, mc_context(question), choices)
        cached = continuation_scores(model, tokenizer, mc_context(question), choices, shared)
        assert [g for _, g in cached] == [g for _, g in plain]
        assert [s for s, _ in cached] == pytest.approx([s for s, _ in plain], abs=1e-4)
    other = PrefixCache(model, tokenizer, "Something else entirely")  # not the context's start: not used
    assert continuation_scores(model, tokenizer, mc_context("What?"), choices, other) == \
        continuation_scores(model, tokenizer, mc_context("What?"), choices)


def test_questions_scored_together_equal_one_at_a_time(tiny_model_dir):
    """Several questions in one batch (contexts of different lengths, continuations sorted across them and cut
    into chunks) give each question the scores it gets alone, with and without the primer's cache; ``rows``
    names the questions of every batch it runs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignx.eval.truthfulqa_mc import batched_continuation_scores, continuation_scores, primer_cache

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    requests = [(mc_context("What is red?"), [" A colour.", " Nothing at all, really, it is a long answer.", " Red."]),
                (mc_context("Is the sky green, or is it some other colour on a clear day?"), [" No.", " Yes, always."]),
                (mc_context("Why?"), [" Because.", " Nobody knows why, and nobody will."])]
    seen = []

    def rows(questions):
        seen.append(questions)
        return contextlib.nullcontext()

    shared = primer_cache(model, tokenizer)
    for prefix in (None, shared):
        together = batched_continuation_scores(model, tokenizer, requests, prefix, rows=rows, max_rows=3)
        for (context, choices), scores in zip(requests, together):
            alone = continuation_scores(model, tokenizer, context, choices, prefix)
            assert [g for _, g in scores] == [g for _, g in alone]
            assert [s for s, _ in scores] == pytest.approx([s for s, _ in alone], abs=1e-4)
    assert seen[0] == [0, 1, 2]  # the contexts: one batch of every question
    assert all(len(batch) <= 3 for batch in seen[1:]) and sorted(q for batch in seen[1:4] for q in batch) == [0, 0, 0, 1, 1, 2, 2]
