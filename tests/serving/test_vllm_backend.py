"""The vLLM hand-off without vLLM: routing -> adapters, the exact merge on disk, and the engine glue against a
fake ``vllm`` module."""

from __future__ import annotations

import asyncio
import dataclasses
import http.client
import itertools
import json
import sys
import time
import types
from pathlib import Path

import openai
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from alignx.axes import AXES
from alignx.errors import AlignXError
from alignx.serving import vllm_backend
from alignx.serving.app import ServeSettings, create_app, serve_in_thread
from alignx.serving.metrics import Metrics
from alignx.serving.vllm_backend import AdapterCache, adapter_id, merge_adapters, quantise
from alignx.stage1.task_vector import lora_factors


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(min_value=0, max_value=1), min_size=1, max_size=5).filter(lambda w: sum(w) > 1e-6))
def test_quantised_rows_that_sum_to_one_are_grid_steps_that_sum_to_the_grid(weights):
    row = [w / sum(weights) for w in weights]  # a routed row
    steps = quantise(row, grid=10)
    assert sum(steps) == 10 and all(s >= 0 for s in steps)
    assert all(abs(s - w * 10) < 1 for s, w in zip(steps, row))


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(min_value=0, max_value=1), min_size=1, max_size=5))
def test_quantising_never_renormalises(weights):
    steps = quantise(weights, grid=10)
    assert sum(steps) == round(sum(w * 10 for w in weights)) and all(abs(s - w * 10) < 1 for s, w in zip(steps, weights))


def test_adapter_ids_are_stable_positive_and_unique():
    vectors = [v for v in itertools.product(range(11), repeat=3) if sum(v) == 10]
    ids = [adapter_id(v) for v in vectors]
    assert min(ids) > 0 and len(set(ids)) == len(ids) and adapter_id((2, 3, 5)) == adapter_id((2, 3, 5))
    for bad in ([0.5, float("nan")], [1.5, 0.0], [-0.2, 1.0], []):
        with pytest.raises(AlignXError, match="cannot quantise"):
            quantise(bad)


def test_the_base_fallback_and_stacked_experts_keep_their_meaning(adapter_dirs, tmp_path):
    cache = AdapterCache(adapter_dirs, tmp_path)
    assert quantise([0.0, 0.0, 0.0]) == (0, 0, 0) and cache.choose([0.0, 0.0, 0.0]) is None  # the base model
    stacked = cache.choose([1.0, 1.0, 1.0])  # sft-sequential's three adapters at full weight, not thirds
    assert quantise([1.0, 1.0, 1.0]) == (10, 10, 10) and stacked.int_id == adapter_id((10, 10, 10))
    merged = lora_factors(stacked.path)
    experts = [lora_factors(d) for d in adapter_dirs.values()]
    module = next(iter(merged))
    torch.testing.assert_close(merged[module].delta(), sum(e[module].delta() for e in experts))


@pytest.fixture(scope="module")
def adapter_dirs(tiny_stage2_run):
    from alignx.run import RunDir

    run = RunDir(tiny_stage2_run.run_dir)
    return {axis: run.adapter_dir(axis) for axis in AXES}


def test_merged_adapter_is_the_exact_weighted_sum(adapter_dirs, tmp_path, tiny_model_dir):
    weights = [0.5, 0.3, 0.2]
    merge_adapters(list(adapter_dirs.values()), weights, tmp_path / "merged")
    merged = lora_factors(tmp_path / "merged")
    experts = [lora_factors(d) for d in adapter_dirs.values()]
    for module, factors in merged.items():
        expected = sum(w * e[module].delta() for w, e in zip(weights, experts))
        torch.testing.assert_close(factors.delta(), expected, rtol=1e-5, atol=1e-6)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "merged")


def test_adapter_cache_picks_experts_merges_once_and_evicts(adapter_dirs, tmp_path):
    cache = AdapterCache(adapter_dirs, tmp_path, capacity=2)

    def use(weights):  # a request routed to these weights, then served
        choice = cache.choose(weights)
        cache.release(choice)
        return choice

    alone = use([0.02, 0.97, 0.01])
    assert alone.path == adapter_dirs["harmless"] and alone.name == "harmless"
    first = use([0.6, 0.3, 0.1])
    assert first.path.is_dir() and first.int_id == adapter_id((6, 3, 1))
    assert use([0.61, 0.29, 0.1]) == first  # same grid point: the same adapter, not merged again
    use([0.2, 0.3, 0.5])
    use([0.1, 0.1, 0.8])
    assert not first.path.exists()  # least recently used, evicted
    assert use([0.6, 0.3, 0.1]).path.is_dir()  # and merged again on demand


def test_an_adapter_a_request_has_not_loaded_yet_is_never_evicted(adapter_dirs, tmp_path):
    cache = AdapterCache(adapter_dirs, tmp_path, capacity=1)
    first = cache.choose([0.6, 0.3, 0.1])  # routed; vLLM has not loaded it yet
    second = cache.choose([0.2, 0.3, 0.5])  # over capacity, but the first is in use
    assert first.path.is_dir() and second.path.is_dir()
    cache.release(first)
    assert not first.path.exists() and second.path.is_dir()  # evicted once its request is done
    cache.release(second)
    assert second.path.is_dir()  # within capacity: kept for the next request


def test_the_reported_weights_are_the_weights_served(adapter_dirs, tmp_path):
    cache = AdapterCache(adapter_dirs, tmp_path)
    served = cache.served([1 / 3] * 3)
    assert served == [0.4, 0.3, 0.3] and list(cache.choose([1 / 3] * 3).steps) == [4, 3, 3]


def test_engine_arguments_fit_every_merge(adapter_dirs):
    arguments = vllm_backend.engine_arguments("some/model", list(adapter_dirs.values()), cached_adapters=4)
    ranks = sum(lora_factors(d)[next(iter(lora_factors(d)))].A.shape[0] for d in adapter_dirs.values())
    assert arguments["enable_lora"] and arguments["max_lora_rank"] >= ranks
    assert arguments["max_lora_rank"] in vllm_backend.VLLM_LORA_RANKS and arguments["max_cpu_loras"] == 7


def test_missing_vllm_is_explained(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(AlignXError, match=r"pip install 'alignx\[vllm\]'"):
        vllm_backend.import_vllm()


class _FakeEngine:
    calls: list = []

    @classmethod
    def from_engine_args(cls, args):
        cls.args = args
        return cls()

    async def generate(self, prompt, params, request_id, lora_request=None):
        _FakeEngine.calls.append((prompt, params, lora_request))
        for text, finished in (("Hel", False), ("Hello", True)):
            completion = types.SimpleNamespace(text=text, token_ids=list(range(len(text))), finish_reason="length")
            yield types.SimpleNamespace(outputs=[completion], finished=finished)


@pytest.fixture()
def fake_vllm(monkeypatch):
    vllm = types.ModuleType("vllm")
    vllm.AsyncEngineArgs = lambda **kw: types.SimpleNamespace(**kw)
    vllm.SamplingParams = lambda **kw: types.SimpleNamespace(**kw)
    vllm.AsyncLLMEngine = _FakeEngine
    request = types.ModuleType("vllm.lora.request")
    request.LoRARequest = lambda name, int_id, path: types.SimpleNamespace(name=name, int_id=int_id, path=path)
    for name, module in (("vllm", vllm), ("vllm.lora", types.ModuleType("vllm.lora")), ("vllm.lora.request", request)):
        monkeypatch.setitem(sys.modules, name, module)
    _FakeEngine.calls = []
    return _FakeEngine


def test_requests_reach_vllm_with_their_adapter(fake_vllm, aligner):
    metrics = Metrics()
    engine = vllm_backend.VLLMEngine(aligner, metrics, merged_adapters=2)
    assert fake_vllm.args.enable_lora and fake_vllm.args.model
    with serve_in_thread(create_app(engine, ServeSettings(model_name="tiny"), metrics)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        response = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=5, temperature=0, stop=["!"])
        streamed = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=5, temperature=0, stream=True)
        pieces = [c.choices[0].delta.content or "" for c in streamed]
        prompt, params, lora = fake_vllm.calls[0]
        assert lora.int_id > 0 and (Path(lora.path) / "adapter_config.json").is_file()
    assert response.choices[0].message.content == "Hello" == "".join(pieces)
    assert response.choices[0].finish_reason == "length" and response.usage.completion_tokens == 5
    routing = response.model_extra["alignx"]
    assert sum(routing["weights"].values()) == pytest.approx(1, abs=1e-4) and routing["explanation"]["adapter"]
    assert prompt["prompt_token_ids"] and params.max_tokens == 5 and params.temperature == 0 and params.stop == ["!"]
    assert not engine._workdir.exists()  # the merged adapters go with the server


def test_the_base_fallback_is_served_by_the_base_model(fake_vllm, aligner):
    config = aligner.router.config
    aligner.router.config = dataclasses.replace(config, ood_alpha=1.01, ood_fallback="base")  # every prompt flagged
    try:
        metrics = Metrics()
        engine = vllm_backend.VLLMEngine(aligner, metrics)
        with serve_in_thread(create_app(engine, ServeSettings(model_name="tiny"), metrics)) as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
            response = client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=5, temperature=0)
    finally:
        aligner.router.config = config
    assert response.choices[0].message.content == "Hello" and fake_vllm.calls[0][2] is None  # no LoRA request
    routing = response.model_extra["alignx"]
    assert routing["explanation"]["ood"] and routing["explanation"]["adapter"] is None
    assert set(routing["weights"].values()) == {0.0}


def test_the_response_reports_the_weights_vllm_serves(fake_vllm, aligner, monkeypatch):
    thirds = torch.full((1, 3), 1 / 3)
    monkeypatch.setattr(aligner, "weights_for", lambda prompts: (thirds, [{"final": {}}]))
    metrics = Metrics()
    engine = vllm_backend.VLLMEngine(aligner, metrics)
    with serve_in_thread(create_app(engine, ServeSettings(model_name="tiny"), metrics)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        response = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                                  max_tokens=5)
    routing = response.model_extra["alignx"]
    assert routing["explanation"]["adapter"] == "helpful4-harmless3-honest3" == fake_vllm.calls[0][2].name
    assert routing["weights"] == {"helpful": 0.4, "harmless": 0.3, "honest": 0.3}  # served, not the router's thirds


class _SlowEngine(_FakeEngine):
    """Streams a long answer slowly, and records the requests it is told to abort."""

    aborted: list = []

    async def generate(self, prompt, params, request_id, lora_request=None):
        _FakeEngine.calls.append((prompt, params, lora_request, request_id))
        for i in range(1, 500):
            await asyncio.sleep(0.02)
            completion = types.SimpleNamespace(text="x" * i, token_ids=list(range(i)), finish_reason=None)
            yield types.SimpleNamespace(outputs=[completion], finished=False)

    async def abort(self, request_id):
        _SlowEngine.aborted.append(request_id)


@pytest.mark.parametrize("stream", [True, False])
def test_a_departed_client_is_aborted_in_vllm_and_frees_its_adapter(fake_vllm, aligner, monkeypatch, stream):
    monkeypatch.setattr(sys.modules["vllm"], "AsyncLLMEngine", _SlowEngine)
    _SlowEngine.aborted = []
    monkeypatch.setattr(aligner, "weights_for", lambda prompts: (torch.tensor([[0.5, 0.3, 0.2]]), [{}]))
    metrics = Metrics()
    engine = vllm_backend.VLLMEngine(aligner, metrics)
    with serve_in_thread(create_app(engine, ServeSettings(model_name="tiny"), metrics)) as url:
        connection = http.client.HTTPConnection(url.removeprefix("http://"), timeout=30)
        body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "stream": stream}
        connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        deadline = time.monotonic() + 30
        while not fake_vllm.calls:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        if stream:
            connection.getresponse().read1(100)  # a first event or two
        connection.close()
        while not _SlowEngine.aborted:
            assert time.monotonic() < deadline, "the request was not aborted in vLLM"
            time.sleep(0.02)
        assert _SlowEngine.aborted == [fake_vllm.calls[0][3]]  # that very request
        while engine.adapters._pins or metrics.queue_depth.value:
            assert time.monotonic() < deadline
            time.sleep(0.02)
