"""The published OpenAPI schema, fuzzed by schemathesis against the tiny served model on loopback: every check
of schemathesis passes on every operation (no 5xx, documented statuses, content types and headers, bodies and
stream events that match their models, authentication enforced, schema-valid requests accepted, invalid ones
refused). One limit is in tokens, which JSON Schema cannot state: a prompt over the server's max_prompt_tokens
is refused with 400 context_length_exceeded (as the schema's description says), and only for that answer the
acceptance check is left out."""

from __future__ import annotations

import json
import urllib.request

import pytest
from hypothesis import HealthCheck, settings

from alignx.serving.app import create_app
from alignx.serving.metrics import Metrics
from tests.serving.conftest import API_KEY, SETTINGS

schemathesis = pytest.importorskip("schemathesis")
from schemathesis.specs.openapi.checks import positive_data_acceptance  # noqa: E402


class _Engine:  # the schema depends on the settings only; the live server has the real engine
    method = "alignx"


PUBLISHED = create_app(_Engine(), SETTINGS, Metrics()).openapi()
schema = schemathesis.openapi.from_dict(PUBLISHED)


def test_the_server_publishes_its_schema_at_openapi_json(live_server):
    with urllib.request.urlopen(f"{live_server.url}/openapi.json", timeout=30) as response:
        served = json.load(response)
    assert served == PUBLISHED
    assert set(served["paths"]) == {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics"}
    body = served["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/ChatCompletionRequest"}


@schema.parametrize()
@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_every_operation_conforms_to_the_published_schema(case, live_server):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    response = case.call(base_url=live_server.url, headers=headers, timeout=60)
    too_long = response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"
    case.validate_response(response, headers=headers, transport_kwargs={"base_url": live_server.url},
                           excluded_checks=[positive_data_acceptance] if too_long else None)
