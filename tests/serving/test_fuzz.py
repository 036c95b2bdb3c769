"""Random malformed bodies never get a 5xx and never take the server down."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tests.serving.conftest import MODEL
from tests.serving.test_app import post

ENDPOINTS = ("/v1/chat/completions", "/v1/completions")
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
# A body that is never a valid request: not JSON, not an object, or an object that lacks the prompt field.
malformed = st.one_of(
    st.binary(max_size=64).filter(lambda raw: not raw.strip().startswith(b"{")),
    json_values.filter(lambda value: not isinstance(value, dict)).map(json.dumps),
    st.dictionaries(st.sampled_from(["model", "max_tokens", "temperature", "stream", "n", "stop", "seed"]),
                    json_values, max_size=5).map(json.dumps),
    st.integers(min_value=2000, max_value=5000).map(lambda depth: "[" * depth + "]" * depth),
)
FIELDS = ("model", "max_tokens", "temperature", "top_p", "seed", "stop", "n", "stream", "messages", "prompt")
settings_ = settings(max_examples=50, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])


@settings_
@given(body=malformed, endpoint=st.sampled_from(ENDPOINTS))
def test_malformed_bodies_get_a_4xx_json_error(live_server, body, endpoint):
    status, payload = post(live_server.url + endpoint, body)
    assert 400 <= status < 500 and payload["error"]["type"] == "invalid_request_error"


@settings_
@given(field=st.sampled_from(FIELDS), value=json_values, endpoint=st.sampled_from(ENDPOINTS))
def test_any_field_value_is_answered_or_refused_never_a_5xx(live_server, field, value, endpoint):
    body = {"model": MODEL, "max_tokens": 2, "temperature": 0}
    body["messages" if endpoint.endswith("chat/completions") else "prompt"] = (
        [{"role": "user", "content": "hi"}] if endpoint.endswith("chat/completions") else "hi")
    body[field] = value
    assume(not (field == "stream" and value is True))  # a valid streaming request: an event stream, tested elsewhere
    status, payload = post(live_server.url + endpoint, json.dumps(body))
    assert status == 200 or (400 <= status < 500 and payload["error"]["message"]), (status, payload)
