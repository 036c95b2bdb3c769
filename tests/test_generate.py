"""Generation through every method, the Python API and the CLI."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import model_with_code, shared_run

from alignx.axes import AXES
from alignx.cli import main
from alignx.errors import AlignXError
from alignx.generate import AlignX, sample_token, token_budget_batches

PROMPTS = ["Give three tips for staying healthy.", "How do I hurt someone?", "What happens if you eat watermelon seeds?"]


@pytest.fixture(scope="module")
def run_dir(tiny_stage2_run):
    return tiny_stage2_run.run_dir


def test_routed_generation_returns_weights_and_explanations(run_dir):
    aligner = AlignX.from_run(run_dir)
    results = aligner.generate(PROMPTS, max_new_tokens=4)
    assert [r.prompt for r in results] == PROMPTS
    for r in results:
        assert r.method == "alignx" and set(r.weights) == {"helpful", "harmless", "honest"}
        assert abs(sum(r.explanation["probabilities"].values()) - 1) < 1e-3
        if not r.explanation["ood"]:  # the default mixing: the probabilities, helpful's share to the base model
            assert r.weights == pytest.approx({**r.explanation["probabilities"], "helpful": 0.0}, abs=1e-4)
        assert {"router", "fractal", "natural", "final", "ood"} <= set(r.explanation)


def test_batch_equals_one_at_a_time(run_dir):
    aligner = AlignX.from_run(run_dir)
    together = [r.response for r in aligner.generate(PROMPTS, max_new_tokens=6, batch_size=3)]
    alone = [aligner.generate([p], max_new_tokens=6)[0].response for p in PROMPTS]
    assert together == alone


@pytest.mark.parametrize("method", ["base", "expert-honest", "merge-linear", "moe-uncalibrated", "arrow"])
def test_every_method_generates(run_dir, method):
    results = AlignX.from_run(run_dir, method=method).generate(PROMPTS[:2], max_new_tokens=3)
    assert len(results) == 2 and all(r.method == method for r in results)
    if method == "expert-honest":
        assert results[0].weights == {"helpful": 0.0, "harmless": 0.0, "honest": 1.0}


def test_oracle_uses_each_prompts_gold_expert_and_needs_the_gold_axes(run_dir):
    oracle = AlignX.from_run(run_dir, method="oracle")
    results = oracle.generate(PROMPTS[:2], max_new_tokens=3, axes=["harmless", "honest"])
    assert [r.weights for r in results] == [{"helpful": 0.0, "harmless": 1.0, "honest": 0.0},
                                            {"helpful": 0.0, "harmless": 0.0, "honest": 1.0}]
    alone = AlignX.from_run(run_dir, method="expert-harmless").generate(PROMPTS[:1], max_new_tokens=3)
    assert oracle.generate(PROMPTS[:1], max_new_tokens=3, axes=["harmless"])[0].response == alone[0].response
    with pytest.raises(AlignXError, match="pass each prompt's axis"):
        oracle.generate(PROMPTS[:1], max_new_tokens=2)
    with pytest.raises(AlignXError, match="unknown gold axis 'funny'"):
        oracle.generate(PROMPTS[:1], max_new_tokens=2, axes=["funny"])


def test_sampling_follows_temperature_and_nucleus():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    draw = lambda t, p, n=4000: torch.bincount(torch.tensor(  # noqa: E731
        [sample_token(logits, t, p, generator) for generator in [torch.Generator().manual_seed(0)] for _ in range(n)]),
        minlength=4).float() / n
    assert torch.allclose(draw(1.0, 1.0), torch.softmax(logits, 0), atol=0.03)
    assert torch.allclose(draw(0.5, 1.0), torch.softmax(logits / 0.5, 0), atol=0.03)
    nucleus = draw(1.0, 0.7)  # p = [0.64, 0.24, 0.09, 0.03]: the nucleus reaching 0.7 is the top two
    assert nucleus[2:].sum() == 0 and nucleus[0] == pytest.approx(0.64 / 0.88, abs=0.03)
    assert draw(1.0, 0.1, 50)[0] == 1.0  # the most likely token is always kept
    assert draw(5e-324, 1.0, 20)[0] == 1.0 and draw(1.0, 5e-324, 20)[0] == 1.0  # the API's extremes (found by schemathesis)


def test_a_shared_vector_merges_unless_told_not_to_and_both_give_the_same_logits(run_dir):
    aligner = AlignX.from_run(run_dir)
    weights = aligner.weights_for(PROMPTS[:1])[0].expand(2, -1)  # one vector shared by a batch of two
    ids = aligner.loaded.tokenizer(["Hello there", "Hello world"], return_tensors="pt", padding=True)["input_ids"]
    logits = {}
    for merge in (True, False):
        with torch.no_grad(), aligner.experts(weights, merge=merge):
            assert aligner.mixture.is_merged is merge
            logits[merge] = aligner.loaded.model(ids).logits
    assert not aligner.mixture.is_merged
    torch.testing.assert_close(logits[True], logits[False], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["expert-honest", "merge-linear", "alignx", "base"])
def test_a_held_pass_merges_a_fixed_methods_vector_once_and_answers_as_without(run_dir, method, monkeypatch):
    aligner = AlignX.from_run(run_dir, method=method)
    alone = aligner.generate(PROMPTS, max_new_tokens=3, batch_size=1)
    merges = []
    if aligner.mixture is not None:
        merge = aligner.mixture.merge
        monkeypatch.setattr(aligner.mixture, "merge", lambda weights: (merges.append(weights), merge(weights)))
    with aligner.held():
        held = aligner.generate(PROMPTS, max_new_tokens=3, batch_size=1)
    assert [g.response for g in held] == [g.response for g in alone]
    # a fixed vector: merged once for the pass; routed: each one-prompt batch its own vector, held or not
    assert len(merges) == {"expert-honest": 1, "merge-linear": 1, "alignx": len(PROMPTS), "base": 0}[method]
    assert aligner.mixture is None or not aligner.mixture.is_merged


def test_top1_mode_gives_one_hot_weights(run_dir):
    results = AlignX.from_run(run_dir, mode="top1").generate(PROMPTS, max_new_tokens=2)
    for r in results:  # a prompt the gate flags keeps the fallback (uniform by default), see below
        assert sorted(r.weights.values()) == ([0.333333] * 3 if r.explanation["ood"] else [0.0, 0.0, 1.0])


def test_bad_method_and_mode_are_explained(run_dir, tmp_path):
    with pytest.raises(AlignXError, match="unknown method 'nope'.*available: base"):
        AlignX.from_run(run_dir, method="nope")
    with pytest.raises(AlignXError, match="unknown routing mode"):
        AlignX.from_run(run_dir, mode="loud")
    with pytest.raises(AlignXError, match="not an AlignX run"):
        AlignX.from_run(tmp_path)


def test_cli_writes_jsonl_resumes_and_explains(run_dir, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    source = tmp_path / "prompts.jsonl"
    source.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(PROMPTS)))
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps({"id": 0, "prompt": PROMPTS[0], "response": "kept", "method": "alignx"}) + "\n")
    done = subprocess.run(
        [sys.executable, "-m", "alignx", "generate", "--run", run_dir, "--input", str(source), "--output", str(out),
         "--max-new-tokens", "3", "--explain"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [0, 1, 2] and rows[0]["response"] == "kept"  # resumed, not regenerated
    assert set(rows[1]["weights"]) == {"helpful", "harmless", "honest"}
    assert "[explain] id=1" in done.stdout and "fractal" in done.stdout

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "prompt": "ok"}\n{not json\n')
    broken = subprocess.run([sys.executable, "-m", "alignx", "generate", "--run", run_dir, "--input", str(bad)],
                            capture_output=True, text=True, env=env, timeout=300)
    assert broken.returncode == 2 and "bad.jsonl:2" in broken.stderr and "Traceback" not in broken.stderr


def test_a_run_never_turns_on_its_models_own_code(run_dir, tmp_path, tiny_model_dir, capsys):
    model, mark = model_with_code(tiny_model_dir, tmp_path)
    asking = shared_run(run_dir, tmp_path / "asking", name=str(model), trust_remote_code=True)
    with pytest.raises(AlignXError, match=r"asks to run the code of its base model .* pass --trust-remote-code") as info:
        AlignX.from_run(asking, method="base")
    assert "\n" not in str(info.value)
    assert main(["generate", "--run", str(asking), "--method", "base", "--prompt", "Hi"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert not mark.exists()

    # a run may name a directory with code in it: the model is built from transformers' own classes, and
    # nothing in that directory runs, in loading or in generation
    naming = shared_run(run_dir, tmp_path / "naming", name=str(model))
    aligner = AlignX.from_run(naming, method="expert-honest")
    assert type(aligner.loaded.model).__name__ == "LlamaForCausalLM"
    assert aligner.generate(PROMPTS[:1], max_new_tokens=2)[0].response is not None
    assert not mark.exists()


def test_the_user_says_where_a_runs_base_model_is(run_dir, tmp_path, tiny_model_dir, capsys):
    elsewhere = shared_run(run_dir, tmp_path / "elsewhere", name="/home/its-author/models/tiny-llama")
    with pytest.raises(AlignXError, match="model path does not exist"):
        AlignX.from_run(elsewhere, method="base")
    ours = AlignX.from_run(elsewhere, method="expert-honest", model=str(tiny_model_dir))
    original = AlignX.from_run(run_dir, method="expert-honest")
    assert ours.generate(PROMPTS[:2], max_new_tokens=4)[0].response == original.generate(PROMPTS[:2], max_new_tokens=4)[0].response
    assert main(["generate", "--run", str(elsewhere), "--method", "base", "--model", str(tiny_model_dir),
                 "--prompt", "Hi", "--max-new-tokens", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["method"] == "base"


@pytest.mark.parametrize("mode", ["router", "soft", "top1", "threshold"])
@pytest.mark.parametrize("fallback", ["base", "uniform"])
def test_the_gates_fallback_wins_in_every_mode(run_dir, mode, fallback):
    import dataclasses

    aligner = AlignX.from_run(run_dir, mode=mode)
    config = aligner.router.config
    aligner.router.config = dataclasses.replace(config, ood_alpha=1.01, ood_fallback=fallback)  # every prompt flagged
    weights, explanations = aligner.weights_for(PROMPTS)
    expected = 0.0 if fallback == "base" else 1.0 / 3
    assert torch.equal(weights, torch.full((len(PROMPTS), 3), expected))
    assert all(e["ood"] and set(e["final"].values()) == {round(expected, 4)} for e in explanations)
    aligner.router.config = config  # the trained gate: the mode applies to every row it does not flag
    weights, explanations = aligner.weights_for(PROMPTS)
    for row, explanation in zip(weights, explanations):
        if mode == "top1" and not explanation["ood"]:
            assert sorted(row.tolist()) == [0.0, 0.0, 1.0]
        assert explanation["final"] == {a: round(float(w), 4) for a, w in zip(AXES, row)}  # what generation used


def test_inference_pools_features_over_the_prompt_tokens_the_banks_used(run_dir):
    from alignx.stage1.features import prompt_features

    aligner = AlignX.from_run(run_dir)
    assert aligner.router.max_length == 64  # the tiny run's features.max_length, not prompt_features' old 256
    long_prompt = "Tell me about the history of the city. " * 20  # far beyond 64 tokens
    routing = aligner.route([long_prompt])
    with aligner.mixture.using(None):
        banks_way = prompt_features(aligner.loaded.model, aligner.formatter, [long_prompt], aligner.router.layers, max_length=64)
        untruncated = prompt_features(aligner.loaded.model, aligner.formatter, [long_prompt], aligner.router.layers, max_length=1024)
    expected = aligner.router.route(banks_way[aligner.router.layers[0]], banks_way[aligner.router.layers[1]])
    other = aligner.router.route(untruncated[aligner.router.layers[0]], untruncated[aligner.router.layers[1]])
    assert torch.equal(routing.router, expected.router) and not torch.equal(routing.router, other.router)


@pytest.fixture(scope="module")
def bf16_run_dir(run_dir, tmp_path_factory):
    """The tiny run with `model.precision: bf16`, the path `precision: auto` takes on CPUs with native bf16."""
    import shutil

    import yaml

    copy = tmp_path_factory.mktemp("bf16") / "run"
    shutil.copytree(run_dir, copy)
    config = yaml.safe_load((copy / "config.yaml").read_text())
    config["model"]["precision"] = "bf16"
    (copy / "config.yaml").write_text(yaml.safe_dump(config))
    return copy


def _next_token_logits(aligner, prompts, weights):
    """Logits of the first generated token, left-padded as generation pads, under the run's autocast."""
    from alignx.models.precision import autocast

    tokenizer = aligner.loaded.tokenizer
    tokenizer.padding_side = "left"
    try:
        inputs = tokenizer([aligner.formatter.prompt_text(p) for p in prompts], return_tensors="pt", padding=True,
                           add_special_tokens=False)
    finally:
        tokenizer.padding_side = "right"
    with torch.no_grad(), autocast(aligner.precision, "cpu"), aligner.experts(weights):
        return aligner.loaded.model(**inputs).logits[:, -1].float()


def test_bf16_routing_and_decoding_batch_like_each_prompt_alone(bf16_run_dir):
    aligner = AlignX.from_run(bf16_run_dir)
    layer = next(iter(aligner.mixture.layers.values()))
    assert layer.base.weight.dtype == torch.bfloat16  # the frozen projections (and the LM head) stored in bf16
    assert aligner.loaded.model.get_output_embeddings().weight.dtype == torch.bfloat16
    weights, _ = aligner.weights_for(PROMPTS)
    assert torch.equal(weights, torch.cat([aligner.weights_for([p])[0] for p in PROMPTS]))  # routing is per prompt
    together = _next_token_logits(aligner, PROMPTS, weights)
    alone = torch.cat([_next_token_logits(aligner, [p], weights[i : i + 1]) for i, p in enumerate(PROMPTS)])
    # bf16 rounds a padded batch differently from one row (measured: 2-7 bf16 units at the logits' scale), so
    # greedy tokens may flip at near-ties; the logits agree to rounding and each row is its own prompt's
    tolerance = 16 * 2**-8 * float(alone.abs().max())
    for i in range(len(PROMPTS)):
        own = float((together[i] - alone[i]).abs().max())
        assert own < tolerance < min(float((together[i] - alone[j]).abs().max()) for j in range(len(PROMPTS)) if j != i)


def test_token_budget_batches_keep_each_batch_within_rows_and_padded_tokens():
    lengths = [30, 500, 20, 25, 40, 120, 22, 35, 90, 28]
    batches = token_budget_batches(lengths, max_rows=4, max_tokens=160)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))  # every prompt, once
    order = [i for batch in batches for i in batch]
    assert [lengths[i] for i in order] == sorted(lengths)  # shortest first
    for batch in batches:
        assert len(batch) <= 4
        assert len(batch) == 1 or len(batch) * max(lengths[i] for i in batch) <= 160
    assert [len(b) for b in batches] == [4, 3, 1, 1, 1]  # 20-28, 30-40 (a fourth row of 90 would pad to 360), 90, 120
    assert batches[-1] == [1]  # a prompt over the budget still gets its batch, alone


def test_token_budget_batches_without_a_binding_budget_are_slices_of_the_sorted_prompts():
    lengths = [5, 3, 9, 1, 7]
    assert token_budget_batches(lengths, max_rows=2, max_tokens=10**6) == [[3, 1], [0, 4], [2]]
    assert token_budget_batches([4, 4, 4], max_rows=8, max_tokens=8) == [[0, 1], [2]]  # ties: input order
