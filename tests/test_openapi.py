"""chatserver.api.openapi: /openapi.json describes the server, and the server keeps to it.

The fuzz test is schemathesis against a real server (real model, API keys on,
``--default-max-tokens 2`` so generation stays cheap): for every operation in
the served document, its examples, its coverage cases (boundaries, missing and
wrong-typed fields, undocumented methods) and a fixed number of generated
requests, valid and invalid. Every answer must be below 500 and conform to the
document: a documented status, content type, headers and body, and for
errors a documented ``code``; invalid requests must be refused with a 4xx, and
the key must be enforced wherever the document says it is. Generation is
derandomized, so a run is the same run every time.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import jsonschema_rs
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.definitions import OPENAPI_31_VALIDATOR
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from chatserver.api.openapi import MAX_TOKENS, SAMPLING, build_document
from chatserver.protocol.sampling import PARAM_NAMES
from tests.serverproc import ServerProcess

KEY = "openapi-fuzz-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
EXAMPLES = 25  # generated requests per operation, besides examples and coverage cases
SEED = 20261201
REPLY_TOKENS = 2  # as --default-max-tokens


@pytest.fixture(scope="module")
def fuzz_server() -> Iterator[ServerProcess]:
    proc = ServerProcess(
        "--api-key",
        KEY,
        "--default-max-tokens",
        str(REPLY_TOKENS),
        "--skip-quality-gate",
        "--log-level",
        "warning",
    ).wait_ready()
    yield proc
    proc.stop()


def _config() -> schemathesis.Config:
    return schemathesis.Config.from_dict(
        {
            "seed": SEED,
            "generation": {"max-examples": EXAMPLES, "deterministic": True, "database": "none"},
            "phases": {"stateful": {"enabled": False}},
            "auth": {"openapi": {"bearerAuth": {"bearer": KEY}}},
            "request-timeout": 60,
            # 101 is /ws upgrading (status_code_conformance still holds every other
            # operation to the statuses it documents).
            "checks": {
                "not_a_server_error": {"expected-statuses": ["101", "2xx", "3xx", "4xx"]},
                "positive_data_acceptance": {
                    "expected-statuses": ["101", "2xx", "3xx", "401", "403", "404", "409", "429"]
                },
            },
            "operations": [
                {
                    # A cursor is valid only when this server issued it: any other
                    # string is well-formed and still 400 invalid_cursor.
                    "include-name": "GET /v1/sessions",
                    "checks": {
                        "positive_data_acceptance": {"expected-statuses": ["200", "400", "401"]}
                    },
                },
                {
                    # Their coverage cases would start a hundred replies each (the model
                    # named by the examples); the boundaries of the parameters they share
                    # are covered on /v1/query, and the fuzzing phase checks that they
                    # accept valid bodies (a body is checked before the model is).
                    "include-name": "POST /v1/completions",
                    "phases": {"coverage": {"generation": {"mode": "negative"}}},
                },
                {
                    # As above; and a schema-valid body can break a cross-field rule the
                    # schema's descriptions state (a tool_choice other than none needs
                    # tools, as on OpenAI), which is 400 invalid_field.
                    "include-name": "POST /v1/chat/completions",
                    "phases": {"coverage": {"generation": {"mode": "negative"}}},
                    "checks": {
                        "positive_data_acceptance": {
                            "expected-statuses": ["200", "400", "401", "404", "429"]
                        }
                    },
                },
                {
                    # As above; and a previous_response_id is valid only when this server
                    # issued it (any other is 400 previous_response_not_found), as are the
                    # cross-field rules the schema's description lists.
                    "include-name": "POST /v1/responses",
                    "phases": {"coverage": {"generation": {"mode": "negative"}}},
                    "checks": {
                        "positive_data_acceptance": {
                            "expected-statuses": ["200", "400", "401", "404", "429"]
                        }
                    },
                },
            ],
        }
    )


# The document a server with keys serves (test_served_document_follows_the_configuration
# checks that it is the one served). Loaded at import: schemathesis makes one test
# per operation at collection.
schema = schemathesis.openapi.from_dict(
    json.loads(json.dumps(build_document(auth=True))), config=_config()
)


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_server_keeps_to_its_document(case: schemathesis.Case, fuzz_server: ServerProcess) -> None:
    cheap(case)
    case.call_and_validate(base_url=fuzz_server.url)


def cheap(case: schemathesis.Case) -> None:
    """Valid reply lengths over REPLY_TOKENS become REPLY_TOKENS, so no reply runs to the
    end of the context (minutes on 2 cores); out-of-range ones stay, to be refused."""
    if not isinstance(case.body, dict):
        return
    for key in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
        value = case.body.get(key)
        if (
            isinstance(value, int | float)
            and not isinstance(value, bool)
            and REPLY_TOKENS < value <= MAX_TOKENS
            and float(value).is_integer()
        ):
            case.body[key] = REPLY_TOKENS


def test_document_is_valid_openapi_31() -> None:
    for auth in (False, True):
        document = json.loads(json.dumps(build_document(auth=auth, metrics_auth=auth)))
        errors = [str(e) for e in OPENAPI_31_VALIDATOR.iter_errors(document)]
        assert errors == []
        for name, body in document["components"]["schemas"].items():
            assert jsonschema_rs.meta.is_valid(body), name


def test_document_names_every_sampling_parameter() -> None:
    assert set(SAMPLING) == PARAM_NAMES


def test_served_document_follows_the_configuration(fuzz_server: ServerProcess) -> None:
    served = requests.get(fuzz_server.url + "/openapi.json", headers=AUTH, timeout=10)
    assert served.status_code == 200 and served.headers["Content-Type"].startswith(
        "application/json"
    )
    document: dict[str, Any] = served.json()
    assert document == json.loads(json.dumps(build_document(auth=True)))
    query = document["paths"]["/v1/query"]["post"]
    assert query["security"] == [{"bearerAuth": []}] and "401" in query["responses"]
    assert document["paths"]["/healthz"]["get"]["security"] == []
    # Without the key the document itself is refused, like every protected route.
    refused = requests.get(fuzz_server.url + "/openapi.json", timeout=10)
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "unauthorized"
    open_server = build_document(auth=False)
    assert open_server["paths"]["/v1/query"]["post"]["security"] == []
    assert "401" not in open_server["paths"]["/v1/query"]["post"]["responses"]


def test_ws_refusals_keep_to_the_document(fuzz_server: ServerProcess) -> None:
    """The frames of the auth contract (schemathesis sees only the upgrade): each fits
    WsServerFrame, request id included, and a wrong key closes with 4401."""
    components = json.loads(json.dumps(build_document(auth=True)))["components"]
    server_frame = jsonschema_rs.validator_for(
        {"$ref": "#/components/schemas/WsServerFrame", "components": components}
    )
    url = fuzz_server.url.replace("http://", "ws://") + "/ws"
    with connect(url, additional_headers={"X-Request-Id": "ws-auth-1"}) as ws:
        ws.send(json.dumps({"type": "chat", "id": "q", "content": "hi"}))
        early = json.loads(ws.recv(timeout=30))
        ws.send(json.dumps({"type": "auth", "api_key": "not-the-key"}))
        wrong = json.loads(ws.recv(timeout=30))
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=30)
    for frame in (early, wrong):
        server_frame.validate(frame)
        assert (frame["code"], frame["request_id"]) == ("unauthorized", "ws-auth-1")
    assert early["id"] == "q"
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401


def test_what_the_fuzz_found_stays_fixed(fuzz_server: ServerProcess) -> None:
    """The fuzz test's finds, pinned: its generated cases move when the document does."""
    url = fuzz_server.url
    # A role that is not a string was a 500 (unhashable in the role table).
    body = {"model": "SmolLM2-135M-Instruct", "messages": [{"role": {}, "content": "hi"}]}
    r = requests.post(url + "/v1/chat/completions", json=body, headers=AUTH, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].role"
    # 2.0 is the integer 2 (JSON Schema's reading, and the document's).
    r = requests.post(
        url + "/v1/query", json={"message": "hi", "max_tokens": 2.0}, headers=AUTH, timeout=30
    )
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 2
    r = requests.post(
        url + "/v1/query", json={"message": "hi", "max_tokens": 2.5}, headers=AUTH, timeout=30
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_parameter"
    # A method a public route does not take is a 405 without a key, not a 401.
    r = requests.request("TRACE", url + "/healthz", timeout=10)
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
    r = requests.request("TRACE", url + "/v1/query", timeout=10)
    assert r.status_code == 401
    # A 401 carries the request id like every other error.
    r = requests.get(url + "/v1/models", headers={"X-Request-Id": "no-key-1"}, timeout=10)
    assert (r.status_code, r.json()["error"]["request_id"]) == (401, "no-key-1")
    # A GET /ws that is not an upgrade says so.
    r = requests.get(url + "/ws", headers=AUTH, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_upgrade"
    # A refused CORS preflight (answered before the error middleware) too.
    preflight = {
        "Origin": "https://elsewhere.example",
        "Access-Control-Request-Method": "POST",
        "X-Request-Id": "cors-1",
    }
    r = requests.options(url + "/v1/query", headers=preflight, timeout=10)
    assert (r.status_code, r.json()["error"]["request_id"]) == (403, "cors-1")
