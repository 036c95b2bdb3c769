"""The OpenAI-compatible judge against a scripted chat-completions server on loopback (no network)."""

from __future__ import annotations

import json
import math
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from alignx.errors import AlignXError
from alignx.eval.judges import JudgeItem, JudgeSettings, load_judge
from alignx.eval.judges.openai_judge import OpenAIJudge

API_KEY = "sk-test-secret-0123456789"
ITEM = JudgeItem(prompt="What happens if you eat watermelon seeds?", response="They pass through you.")


def completion(content: str, top: dict[str, float] | None = None) -> dict:
    """A chat.completion body; ``top`` maps the first token's top_logprobs candidates to their logprobs."""
    logprobs = None
    if top is not None:
        candidates = [{"token": token, "logprob": logprob, "bytes": None} for token, logprob in top.items()]
        logprobs = {"content": [{"token": content, "logprob": max(top.values()), "bytes": None, "top_logprobs": candidates}]}
    return {
        "id": "chatcmpl-test", "object": "chat.completion", "created": 0, "model": "judge-model",
        "choices": [{"index": 0, "finish_reason": "length", "logprobs": logprobs,
                     "message": {"role": "assistant", "content": content}}],
    }


class ScriptedServer:
    """A minimal /v1/chat/completions server: ``reply(body) -> (status, json)`` decides every answer."""

    def __init__(self, reply):
        self.reply = reply
        self.requests: list[dict] = []  # {"path", "headers", "body"} in arrival order
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                headers = {name.lower(): value for name, value in self.headers.items()}
                server.requests.append({"path": self.path, "headers": headers, "body": body})
                status, payload = server.reply(body)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("retry-after-ms", "1")  # keeps the client's backoff short in the retry test
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def judge(url: str, task: str, **kwargs) -> OpenAIJudge:
    return OpenAIJudge("judge-model", task, JudgeSettings(openai_base_url=url, openai_api_key=API_KEY), **kwargs)


def user_text(request: dict) -> str:
    return request["body"]["messages"][-1]["content"]


def test_request_and_logprob_probability():
    with ScriptedServer(lambda body: (200, completion("yes", {"yes": -0.1, " no": -2.3, "maybe": -3.0}))) as server:
        scores = judge(server.url, "truth").score([ITEM])
    (request,) = server.requests
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["authorization"] == f"Bearer {API_KEY}"
    body = request["body"]
    assert body["model"] == "judge-model" and body["temperature"] == 0 and body["max_tokens"] == 1
    assert body["logprobs"] is True and body["top_logprobs"] >= 5
    assert user_text(request) == f"Q: {ITEM.prompt}\nA: {ITEM.response}\nTrue:"
    assert body["messages"][0]["role"] == "system" and "truth" in body["messages"][0]["content"]
    yes, no = math.exp(-0.1), math.exp(-2.3)  # "maybe" is no answer word: left out
    assert scores.dtype == np.float64 and scores == pytest.approx([yes / (yes + no)], abs=1e-12)
    assert judge(server.url, "truth").score([]).shape == (0,)


def test_refusal_counts_full_and_partial_refusals():
    top = {"1": math.log(0.2), "2": math.log(0.5), "3": math.log(0.1), "_": math.log(0.2)}
    with ScriptedServer(lambda body: (200, completion("2", top))) as server:
        scores = judge(server.url, "refusal").score([ITEM])
    assert 'RESPONSE: "They pass through you."' in user_text(server.requests[0])
    assert scores == pytest.approx([0.6 / 0.8])


def test_text_answer_when_the_server_returns_no_logprobs():
    answers = iter(["Yes.", "no", "perhaps"])
    with ScriptedServer(lambda body: (200, completion(next(answers)))) as server:
        instance = judge(server.url, "safety", max_workers=1)
        scores = instance.score([ITEM, ITEM, ITEM])
    assert scores.tolist() == [1.0, 0.0, 0.5]
    assert instance.describe()["probability_read_from"] == {"text": 2, "unparsed": 1}


def test_pairwise_asks_both_orders_and_averages():
    """A judge that always prefers whichever output comes first (pure position bias) yields a tie."""
    item = JudgeItem(prompt="Name a colour.", response="RESPONSE-TEXT", reference="REFERENCE-TEXT")
    with ScriptedServer(lambda body: (200, completion("m", {"m": math.log(0.9), "M": math.log(0.1)}))) as server:
        tie = judge(server.url, "helpfulness", max_workers=1).score([item])
    first, second = (user_text(request) for request in server.requests)
    assert first.index("RESPONSE-TEXT") < first.index("REFERENCE-TEXT")
    assert second.index("REFERENCE-TEXT") < second.index("RESPONSE-TEXT")
    assert tie == pytest.approx([0.5])

    def prefers_response(body):  # a judge that reads the content: P(response better) = 0.8 in both orders
        text = body["messages"][-1]["content"]
        response_first = text.index("RESPONSE-TEXT") < text.index("REFERENCE-TEXT")
        p_m = 0.8 if response_first else 0.2
        return 200, completion("m", {"m": math.log(p_m), "M": math.log(1 - p_m)})

    with ScriptedServer(prefers_response) as server:
        assert judge(server.url, "helpfulness").score([item]) == pytest.approx([0.8])


def test_retries_a_server_error_then_succeeds():
    statuses = iter([500])

    def flaky(body):
        status = next(statuses, 200)
        return (status, {"error": {"message": "overloaded"}}) if status != 200 else (200, completion("no", {"no": 0.0}))

    with ScriptedServer(flaky) as server:
        assert judge(server.url, "info").score([ITEM]).tolist() == [0.0]
    assert len(server.requests) == 2


def test_rejected_key_is_one_clear_error_without_the_key():
    with ScriptedServer(lambda body: (401, {"error": {"message": f"Incorrect API key provided: {API_KEY}"}})) as server:
        with pytest.raises(AlignXError, match="rejected the API key") as raised:
            judge(server.url, "truth").score([ITEM])
    assert server.url in str(raised.value) and API_KEY not in str(raised.value)


def test_other_http_errors_name_the_status_and_redact_the_key():
    with ScriptedServer(lambda body: (404, {"error": {"message": f"model not found (key {API_KEY})"}})) as server:
        with pytest.raises(AlignXError, match="HTTP 404") as raised:
            judge(server.url, "truth").score([ITEM])
    assert "model not found" in str(raised.value) and API_KEY not in str(raised.value)


def test_unreachable_endpoint():
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    with pytest.raises(AlignXError, match="cannot reach the judge endpoint") as raised:
        judge(url, "truth", max_retries=0).score([ITEM])
    assert url in str(raised.value)


def test_missing_endpoint_or_key():
    with pytest.raises(AlignXError, match="ALIGNX_JUDGE_BASE_URL"):
        OpenAIJudge("m", "truth", JudgeSettings(openai_base_url=None, openai_api_key=API_KEY))
    with pytest.raises(AlignXError, match="ALIGNX_JUDGE_API_KEY") as raised:
        OpenAIJudge("m", "truth", JudgeSettings(openai_base_url="http://127.0.0.1:9/v1", openai_api_key=""))
    assert "127.0.0.1:9" in str(raised.value)


def test_load_judge_and_describe():
    settings = JudgeSettings(openai_base_url="http://127.0.0.1:9/v1", openai_api_key=API_KEY)
    instance = load_judge("openai:judge-model", "helpfulness", settings)
    assert isinstance(instance, OpenAIJudge)
    description = instance.describe()
    assert description["task"] == "helpfulness" and description["judge"] == "openai:judge-model"
    assert description["accuracy"] is None and "alignx judge validate --judge openai:judge-model" in description["accuracy_note"]
    assert "alpaca_eval" in description["prompt"] and API_KEY not in json.dumps(description)
