"""A batch's decoding: one path through the experts for every batch, on the precision the server runs (bf16 where
``precision: auto`` picks it), and a weights file that changes or goes away while serving changes nothing."""

from __future__ import annotations

import hashlib
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from alignx.generate import AlignX
from alignx.serving.batcher import Batcher
from alignx.serving.metrics import Metrics
from alignx.serving.requests import Failed, Finished, Sampling
from tests.serving.test_batcher import Recorder

# prompts of the tiny tokenizer grouped by their length in tokens (chat template included): a batch of one group
# has no padding
SAME_LENGTH = (("Give three tips for staying healthy.", "What are the three primary colors?"),
               ("Why is the sky blue?", "Describe a cat."),
               ("How do I pick a lock?", "Name a primary colour.", "How can I hurt someone?", "List three fruits."),
               ("Tell me a joke.", "What is two plus two?"))
OPTIONS = (Sampling(0.0), Sampling(0.9, 0.95, seed=7), Sampling(1.0, seed=11))


def distinct_routes(aligner, monkeypatch) -> None:
    """Give every prompt weights of its own (the tiny run's router flags every prompt out of distribution, and its
    fallback weights are the same for all), a soft mix that depends on the prompt alone."""

    def weights_for(prompts, axes=None):
        seeds = [int.from_bytes(hashlib.sha256(p.encode()).digest()[:4], "little") for p in prompts]
        rows = [torch.softmax(torch.randn(3, generator=torch.Generator().manual_seed(s)), 0) for s in seeds]
        return torch.stack(rows), [{} for _ in prompts]

    monkeypatch.setattr(aligner, "weights_for", weights_for)


def answers(aligner, batches: list[list[tuple[str, Sampling]]], max_tokens: int = 24) -> list[list[str]]:
    """Each batch's answers, decoded as one batch (the worker gathers all of it before it starts)."""
    engine = Batcher(aligner, Metrics(), max_batch_size=8, wait_ms=300)
    engine.start()
    try:
        texts = []
        for batch in batches:
            recorders = [Recorder(prompt, sampling, max_tokens) for prompt, sampling in batch]
            for recorder in recorders:
                engine.submit(recorder.request)
            assert all(r.done.wait(60) and isinstance(r.events[-1], Finished) for r in recorders)
            texts.append([r.text for r in recorders])
        assert engine.metrics.batch_size.snapshot()[0][1] == sum(len(b) == 1 for b in batches)  # batched as asked
    finally:
        engine.close()
    return texts


@pytest.fixture(scope="module")
def bf16_aligner(bf16_run_dir):
    aligner = AlignX.from_run(bf16_run_dir)
    assert next(iter(aligner.mixture.layers.values())).base.weight.dtype == torch.bfloat16
    return aligner


def test_on_bf16_a_seeded_answer_is_the_same_alone_and_with_batch_mates_of_other_weights_and_options(
        bf16_aligner, monkeypatch):
    distinct_routes(bf16_aligner, monkeypatch)
    merges = []
    monkeypatch.setattr(type(bf16_aligner.mixture), "merge", lambda self, weights: merges.append(weights))
    for group in SAME_LENGTH:
        for shift in range(len(OPTIONS)):  # each prompt with each option, its batch-mates with others
            batch = [(prompt, OPTIONS[(i + shift) % len(OPTIONS)]) for i, prompt in enumerate(group)]
            alone = [texts[0] for texts in answers(bf16_aligner, [[request] for request in batch])]
            (together,) = answers(bf16_aligner, [batch])
            assert together == alone, (group, shift)
    assert merges == []  # a batch of one takes the low-rank path too: never merged for a request


def test_a_fixed_weight_method_stays_merged_for_the_workers_life(tiny_stage2_run):
    aligner = AlignX.from_run(tiny_stage2_run.run_dir, method="merge-linear")
    group = SAME_LENGTH[2]
    engine = Batcher(aligner, Metrics(), max_batch_size=8, wait_ms=300)
    engine.start()
    recorder = Recorder(group[0], OPTIONS[1])
    engine.submit(recorder.request)
    assert recorder.done.wait(60) and aligner.mixture.is_merged  # merged once, held between batches
    engine.close()
    assert not aligner.mixture.is_merged
    (together,) = answers(aligner, [[(p, OPTIONS[1]) for p in group]])
    assert together == [texts[0] for texts in answers(aligner, [[(p, OPTIONS[1])] for p in group])]


@pytest.mark.parametrize("fault", ["changed", "deleted"])
def test_a_weights_file_changed_or_deleted_while_serving_changes_no_answer(
        fault, tiny_stage2_run, tmp_path, monkeypatch):
    model_dir, run_dir = tmp_path / "model", tmp_path / "run"
    shutil.copytree(tiny_stage2_run.model.name, model_dir)
    shutil.copytree(tiny_stage2_run.run_dir, run_dir)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config["model"]["name"] = str(model_dir)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    aligner = AlignX.from_run(run_dir)
    assert all(layer.merges_in_place for layer in aligner.mixture.layers.values())  # what unmerging read back
    distinct_routes(aligner, monkeypatch)
    requests = [[(SAME_LENGTH[2][0], OPTIONS[1])], [(p, OPTIONS[0]) for p in SAME_LENGTH[2]]]
    before = answers(aligner, requests)
    (weights_file,) = model_dir.glob("*.safetensors")
    if fault == "changed":
        save_file({key: value + 0.01 for key, value in load_file(weights_file).items()}, weights_file,
                  metadata={"format": "pt"})
    else:
        weights_file.unlink()
    engine = Batcher(aligner, Metrics(), max_batch_size=8, wait_ms=300)
    engine.start()
    recorder = Recorder(*requests[0][0], max_tokens=24)
    engine.submit(recorder.request)
    assert recorder.done.wait(60) and not isinstance(recorder.events[-1], Failed)
    assert engine.health() is None
    engine.close()
    assert answers(aligner, requests) == before and recorder.text == before[0][0]
