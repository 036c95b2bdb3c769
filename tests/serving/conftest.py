"""A live server on loopback for the serving tests: the tiny run behind the real app, uvicorn in a thread, shared
by the whole serving session (one model load)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from alignx.serving.app import ServeSettings

API_KEY = "test-key"
MODEL = "tiny"
SETTINGS = ServeSettings(model_name=MODEL, api_key=API_KEY, max_prompt_tokens=64, max_new_tokens=16)


@dataclass
class LiveServer:
    url: str  # http://127.0.0.1:<port>
    engine: object
    aligner: object


@pytest.fixture(scope="session")
def aligner(tiny_stage2_run):
    from alignx.generate import AlignX

    return AlignX.from_run(tiny_stage2_run.run_dir)


@pytest.fixture(scope="session")
def live_server(aligner):
    from alignx.serving.app import create_app, serve_in_thread
    from alignx.serving.batcher import Batcher
    from alignx.serving.metrics import Metrics

    metrics = Metrics()
    engine = Batcher(aligner, metrics, max_batch_size=8, wait_ms=30)
    with serve_in_thread(create_app(engine, SETTINGS, metrics)) as url:
        yield LiveServer(url, engine, aligner)


@pytest.fixture(scope="session")
def client(live_server):
    import openai

    return openai.OpenAI(base_url=f"{live_server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)
