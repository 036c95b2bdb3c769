"""The server over real HTTP on loopback, through the ``openai`` client where a client would use it."""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import re
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from alignx.serving.app import ServeSettings, create_app, serve_in_thread
from alignx.serving.batcher import Batcher
from alignx.serving.metrics import Metrics
from tests.serving.conftest import API_KEY, MODEL

PROMPT = "Give three tips for staying healthy."


def post(url: str, body: bytes | str, key: str | None = API_KEY) -> tuple[int, dict]:
    """A raw POST (the openai client would refuse to send a malformed body)."""
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    data = body.encode() if isinstance(body, str) else body
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers), timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def metric(server, name: str) -> float:
    text = urllib.request.urlopen(f"{server.url}/metrics", timeout=10).read().decode()
    return sum(float(value) for value in re.findall(rf"^{re.escape(name)} (\S+)$", text, re.M))


def chat(client, prompt=PROMPT, **options):
    options = {"max_tokens": 8, "temperature": 0, **options}
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}], **options)


def test_chat_round_trip_reports_routing(client):
    response = chat(client)
    assert response.object == "chat.completion" and response.model == MODEL
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].finish_reason in {"stop", "length"}
    assert 0 < response.usage.completion_tokens <= 8 and response.usage.prompt_tokens > 0
    routing = response.model_extra["alignx"]
    assert routing["method"] == "alignx" and set(routing["weights"]) == {"helpful", "harmless", "honest"}
    assert sum(routing["weights"].values()) == pytest.approx(1, abs=1e-4)
    assert {"router", "final", "ood"} <= set(routing["explanation"])


def test_completions_endpoint(client):
    response = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0)
    assert response.object == "text_completion" and isinstance(response.choices[0].text, str)
    assert response.usage.completion_tokens <= 5
    assert set(response.model_extra["alignx"]["weights"]) == {"helpful", "harmless", "honest"}


def test_stream_reassembles_to_the_greedy_answer(client):
    whole = chat(client, max_tokens=12).choices[0].message.content
    chunks = list(chat(client, max_tokens=12, stream=True, stream_options={"include_usage": True}))
    assert "alignx" in chunks[0].model_extra and chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in {"stop", "length"}
    assert chunks[-1].usage.completion_tokens > 0 and not chunks[-1].choices
    pieces = [c.choices[0].text for c in client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12,
                                                                    temperature=0, stream=True)]
    assert "".join(pieces) == client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0).choices[0].text


def test_stop_string_cuts_the_answer(client):
    whole = chat(client, max_tokens=16).choices[0].message.content
    if len(whole) < 4:
        pytest.skip("the tiny model answered too briefly to cut")
    stop = whole[2:4]
    response = chat(client, max_tokens=16, stop=[stop])
    assert response.choices[0].message.content == whole[: whole.find(stop)]
    assert response.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in chat(client, max_tokens=16, stop=stop, stream=True))
    assert streamed == whole[: whole.find(stop)]


def test_models_and_health(client, live_server):
    assert [m.id for m in client.models.list()] == [MODEL]
    health = json.loads(urllib.request.urlopen(f"{live_server.url}/health", timeout=10).read())
    assert health["status"] == "ok" and health["method"] == "alignx"


def test_wrong_or_missing_key_is_401(live_server):
    for key in ("wrong-key", "not-even-close-to-the-right-length"):
        bad = openai.OpenAI(base_url=f"{live_server.url}/v1", api_key=key, max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            chat(bad)
    status, body = post(f"{live_server.url}/v1/chat/completions", "{}", key=None)
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(f"{live_server.url}/v1/models", timeout=10)
    assert caught.value.code == 401


@pytest.mark.parametrize(("body", "status", "param"), [
    ('{"model": "tiny", "messages": [', 400, None),
    ("[1, 2]", 400, None),
    ('{"model": "tiny"}', 400, "messages"),
    ('{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "5"}', 400, "max_tokens"),
    ('{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": 3}', 400, "temperature"),
    ('{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "n": 2}', 400, "n"),
    ('{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 17}', 400, "max_tokens"),
    ('{"model": "tiny", "messages": [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"}]}',
     400, "messages"),
    ('{"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}', 404, "model"),
])
def test_bad_requests_get_openai_shaped_errors(live_server, body, status, param):
    got, payload = post(f"{live_server.url}/v1/chat/completions", body)
    assert got == status and payload["error"]["param"] == param and payload["error"]["message"]


def test_over_long_prompt_is_400(client):
    with pytest.raises(openai.BadRequestError, match="over this server's limit") as caught:
        chat(client, prompt="tips " * 200)
    assert caught.value.body["code"] == "context_length_exceeded"


def test_unknown_model_through_the_client(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])


def test_metrics_move(client, live_server):
    before = metric(live_server, 'alignx_requests_total{endpoint="/v1/chat/completions",status="200"}')
    tokens = metric(live_server, "alignx_generated_tokens_total")
    chat(client, max_tokens=4)
    after = metric(live_server, 'alignx_requests_total{endpoint="/v1/chat/completions",status="200"}')
    # the batch's token count lands once its generate returns, which includes unmerging the request's weights
    # (read back from the weights file): shortly after the answer reached the client
    deadline = time.monotonic() + 30
    while metric(live_server, "alignx_generated_tokens_total") <= tokens and time.monotonic() < deadline:
        time.sleep(0.05)
    assert after == before + 1 and metric(live_server, "alignx_generated_tokens_total") > tokens
    assert metric(live_server, "alignx_request_latency_seconds_count") >= 1


def test_concurrent_requests_with_different_sampling_options_share_batches(client, live_server):
    batches_before = metric(live_server, "alignx_batch_size_count")
    prompts = [f"{PROMPT} ({i})" for i in range(32)]
    options = [dict(temperature=0), dict(temperature=0.8, top_p=0.9, seed=1), dict(temperature=1.1, seed=2),
               dict(temperature=0.7, top_p=0.5)]  # greedy, seeded, unseeded: every option differs

    def ask(i):
        response = chat(client, prompt=prompts[i], max_tokens=6, **options[i % 4])
        return prompts[i], response.choices[0].message.content, response.model_extra["alignx"]["weights"]

    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(ask, range(32)))
    assert [a[0] for a in answers] == prompts and all(isinstance(a[1], str) and a[2] for a in answers)
    batches = metric(live_server, "alignx_batch_size_count") - batches_before
    # 8 in flight: batches of several requests whatever their options (split by option, it would take >= 16)
    assert batches <= 10
    assert metric(live_server, "alignx_queue_depth") == 0
    # a seeded request gets the same answer whatever it was batched with
    assert chat(client, prompt=prompts[1], max_tokens=6, **options[1]).choices[0].message.content == answers[1][1]
    assert chat(client, prompt=prompts[0], max_tokens=6, **options[0]).choices[0].message.content == answers[0][1]


def test_a_failing_batch_is_a_500_and_the_server_goes_on(client, live_server, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("simulated decoding failure")

    monkeypatch.setattr(live_server.aligner.loaded.model, "forward", broken)
    with pytest.raises(openai.InternalServerError):
        chat(client)
    chunks = chat(client, stream=True)
    with pytest.raises(openai.APIError, match="generation failed"):
        list(chunks)
    monkeypatch.undo()
    assert chat(client).choices[0].message.content is not None


# ---- a client that leaves ------------------------------------------------------------------------------------


def open_request(server, body: dict) -> http.client.HTTPConnection:
    """Send a completion request and leave the connection open, unread (close it to disconnect)."""
    connection = http.client.HTTPConnection(server.url.removeprefix("http://"), timeout=60)
    connection.request("POST", "/v1/chat/completions", json.dumps(body),
                       {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"})
    return connection


def chat_body(prompt=PROMPT, **options) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": 16, "temperature": 0,
            **options}


def wait_for_metric(server, name: str, value: float, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while metric(server, name) < value:
        assert time.monotonic() < deadline, f"{name} stayed at {metric(server, name)}, below {value}"
        time.sleep(0.02)


def test_a_client_that_leaves_a_non_streaming_request_stops_its_decoding(live_server, decode_steps):
    cancelled, gone = metric(live_server, "alignx_cancelled_requests_total"), client_closed(live_server)
    connection = open_request(live_server, chat_body())
    decode_steps.wait_for(3)
    connection.close()
    decode_steps.wait_for_quiet()
    assert len(decode_steps.rows) <= 5 and set(decode_steps.rows) == {1}  # its 16 tokens would take 15 steps
    assert metric(live_server, "alignx_cancelled_requests_total") == cancelled + 1
    wait_for_metric(live_server, 'alignx_requests_total{endpoint="/v1/chat/completions",status="499"}', gone + 1)
    assert metric(live_server, "alignx_wasted_decode_steps_total") == 0


def test_a_waiting_request_whose_client_left_is_never_decoded(live_server, decode_steps):
    cancelled = metric(live_server, "alignx_cancelled_requests_total")
    first = open_request(live_server, chat_body())
    decode_steps.wait_for(1)  # the first request's batch decodes; the second waits for the next one
    second = open_request(live_server, chat_body("What are the three primary colors?"))
    wait_for_metric(live_server, "alignx_queue_depth", 1)
    second.close()
    response = first.getresponse()
    assert response.status == 200 and json.loads(response.read())["usage"]["completion_tokens"] == 16
    first.close()
    decode_steps.wait_for_quiet()
    assert decode_steps.rows == [1] * 15  # the first request's 15 steps, and no batch for the second
    assert metric(live_server, "alignx_cancelled_requests_total") == cancelled + 1
    assert metric(live_server, "alignx_queue_depth") == 0


def test_a_closed_stream_stops_decoding_at_its_next_step(client, live_server, decode_steps):
    cancelled = metric(live_server, "alignx_cancelled_requests_total")
    stream = chat(client, max_tokens=16, stream=True)
    for _, _ in zip(range(3), stream):  # the first chunk (routing) and two pieces of text
        pass
    stream.close()
    decode_steps.wait_for_quiet()
    assert len(decode_steps.rows) <= 6  # its 16 tokens would take 15 steps
    assert metric(live_server, "alignx_cancelled_requests_total") == cancelled + 1
    assert metric(live_server, "alignx_wasted_decode_steps_total") == 0


def client_closed(server) -> float:
    return metric(server, 'alignx_requests_total{endpoint="/v1/chat/completions",status="499"}')


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


def test_a_client_that_leaves_while_sending_its_body_is_a_quiet_499(live_server):
    records, loggers = _Records(), [logging.getLogger(name) for name in ("uvicorn.error", "alignx.serving")]
    errors = metric(live_server, 'alignx_requests_total{endpoint="/v1/chat/completions",status="500"}')
    gone = client_closed(live_server)
    for logger in loggers:
        logger.addHandler(records)
    try:
        host, port = live_server.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                         f"Authorization: Bearer {API_KEY}\r\nContent-Length: 5000\r\n\r\n{{\"model\": ".encode())
            time.sleep(0.2)  # the server is reading the body when the client goes
        wait_for_metric(live_server, 'alignx_requests_total{endpoint="/v1/chat/completions",status="499"}', gone + 1)
        time.sleep(0.2)
    finally:
        for logger in loggers:
            logger.removeHandler(records)
    assert records.records == []  # no traceback, no error line
    assert metric(live_server, 'alignx_requests_total{endpoint="/v1/chat/completions",status="500"}') == errors


# ---- prompt lengths, health, shutdown ------------------------------------------------------------------------


def test_a_huge_prompt_is_refused_by_its_length_before_it_is_tokenized(client, live_server, monkeypatch):
    huge = "tips " * 180_000  # 900 KB: under the body limit
    with pytest.raises(openai.BadRequestError, match="bytes long, more than this server's limit of 64 tokens") as caught:
        chat(client, prompt=huge)
    assert caught.value.body["code"] == "context_length_exceeded"
    counted = []
    monkeypatch.setattr(live_server.engine.prompts, "count", lambda prompt: counted.append(prompt) or 1)
    with pytest.raises(openai.BadRequestError):
        chat(client, prompt=huge)
    assert counted == []


def test_prompts_are_tokenized_off_the_event_loop(client, live_server, monkeypatch):
    on_the_loop = []
    count = live_server.engine.prompts.count

    def counting(prompt):
        try:
            asyncio.get_running_loop()
            on_the_loop.append(True)
        except RuntimeError:
            on_the_loop.append(False)
        return count(prompt)

    monkeypatch.setattr(live_server.engine.prompts, "count", counting)
    chat(client, max_tokens=2)
    assert on_the_loop == [False]


class _Crash(BaseException):
    """Not an Exception: a failing batch's handler does not catch it, so the worker thread itself stops."""


def test_health_fails_once_the_decoding_worker_has_stopped(aligner, monkeypatch):
    monkeypatch.setattr(aligner, "weights_for", lambda prompts: (_ for _ in ()).throw(_Crash("worker killed")))
    metrics = Metrics()
    with serve_in_thread(create_app(Batcher(aligner, metrics), ServeSettings(model_name=MODEL), metrics)) as url:
        assert json.loads(urllib.request.urlopen(f"{url}/health", timeout=10).read())["status"] == "ok"
        status, payload = post(f"{url}/v1/chat/completions", json.dumps(chat_body()), key=None)
        assert status == 503 and "decoding worker has stopped" in payload["error"]["message"]
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(f"{url}/health", timeout=10)
        assert caught.value.code == 503 and "worker killed" in json.loads(caught.value.read())["error"]["message"]
        status, _ = post(f"{url}/v1/chat/completions", json.dumps(chat_body()), key=None)
        assert status == 503  # refused at once, not queued for a worker that is gone


def test_the_shutdown_timeout_reaches_the_backend(monkeypatch):
    class Engine:
        method, prompts, timeouts = "base", None, []

        def start(self):
            pass

        def health(self):
            return None

        def close(self, timeout=None):
            self.timeouts.append(timeout)

    engine = Engine()
    with serve_in_thread(create_app(engine, ServeSettings(model_name=MODEL, shutdown_timeout=0.5), Metrics())):
        pass
    assert engine.timeouts == [0.5]
