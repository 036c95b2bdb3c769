"""A live server on loopback for the serving tests: the tiny run behind the real app, uvicorn in a thread, shared
by the whole serving session (one model load); the same run in bf16; and a way to watch (and slow) decode steps."""

from __future__ import annotations

import shutil
import threading
import time
from dataclasses import dataclass, field

import pytest
import yaml

from alignx.serving.app import ServeSettings

API_KEY = "test-key"
MODEL = "tiny"
SETTINGS = ServeSettings(model_name=MODEL, api_key=API_KEY, max_prompt_tokens=64, max_new_tokens=16)


@dataclass
class LiveServer:
    url: str  # http://127.0.0.1:<port>
    engine: object
    aligner: object
    metrics: object


@pytest.fixture(scope="session")
def aligner(tiny_stage2_run):
    from alignx.generate import AlignX

    return AlignX.from_run(tiny_stage2_run.run_dir)


@pytest.fixture(scope="session")
def bf16_run_dir(tiny_stage2_run, tmp_path_factory):
    """The tiny run with `model.precision: bf16`, what `precision: auto` picks on a CPU with AVX-512 bf16."""
    copy = tmp_path_factory.mktemp("bf16") / "run"
    shutil.copytree(tiny_stage2_run.run_dir, copy)
    config = yaml.safe_load((copy / "config.yaml").read_text())
    config["model"]["precision"] = "bf16"
    (copy / "config.yaml").write_text(yaml.safe_dump(config))
    return copy


@pytest.fixture(scope="session")
def live_server(aligner):
    from alignx.serving.app import create_app, serve_in_thread
    from alignx.serving.batcher import Batcher
    from alignx.serving.metrics import Metrics

    metrics = Metrics()
    engine = Batcher(aligner, metrics, max_batch_size=8, wait_ms=30)
    with serve_in_thread(create_app(engine, SETTINGS, metrics)) as url:
        yield LiveServer(url, engine, aligner, metrics)


@pytest.fixture(scope="session")
def client(live_server):
    import openai

    return openai.OpenAI(base_url=f"{live_server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


@dataclass
class DecodeSteps:
    """The rows of every decode step (one new token per row) the model has run since the fixture started."""

    rows: list[int] = field(default_factory=list)
    delay_s: float = 0.0  # each step takes at least this long, so a test can act while a batch decodes
    stepped: threading.Condition = field(default_factory=threading.Condition)

    def wait_for_quiet(self, quiet_s: float = 0.5, timeout: float = 30) -> None:
        """Wait until no step has run for ``quiet_s`` (a step takes ``delay_s`` or a little more)."""
        deadline = time.monotonic() + timeout
        with self.stepped:
            while self.stepped.wait(quiet_s):
                assert time.monotonic() < deadline, "decoding never stopped"

    def wait_for(self, steps: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        with self.stepped:
            while len(self.rows) < steps:
                assert self.stepped.wait(deadline - time.monotonic()), f"only {len(self.rows)} decode steps ran"


def watch_decode_steps(model, delay_s: float = 0.0):
    """Record (and slow) ``model``'s decode steps; returns (the record, the hook handle to remove)."""
    steps = DecodeSteps(delay_s=delay_s)

    def before_forward(_module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and ids.shape[1] == 1:  # a decode step; prefills (routing's too) have the prompt's length
            time.sleep(steps.delay_s)
            with steps.stepped:
                steps.rows.append(ids.shape[0])
                steps.stepped.notify_all()

    return steps, model.register_forward_pre_hook(before_forward, with_kwargs=True)


@pytest.fixture()
def decode_steps(aligner):
    """The tiny run's decode steps during one test, each slowed to 40 ms."""
    steps, handle = watch_decode_steps(aligner.loaded.model, delay_s=0.04)
    yield steps
    handle.remove()
