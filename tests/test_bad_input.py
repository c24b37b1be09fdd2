"""Bad input of every kind gets a clear JSON error, and the server keeps serving.

Covers the HTTP routes (malformed JSON, wrong types, out-of-range parameters,
oversized bodies, prompts beyond the context, unknown routes and sessions) and
the WebSocket (the same for frames, plus binary and oversized frames).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import websockets
from websockets.exceptions import ConnectionClosed

from tests.serverproc import ServerProcess

MAX_BODY = 1 << 20  # settings.max_body_bytes default
MAX_FRAME = 64 << 10  # settings.max_frame_bytes default
TOO_LONG = "hello " * 5000  # ~5000 tokens: over the 4096-token context


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        yield session


async def post(
    http: aiohttp.ClientSession, url: str, data: bytes | str
) -> tuple[int, dict[str, Any]]:
    async with http.post(url, data=data, headers={"Content-Type": "application/json"}) as r:
        assert r.headers["Content-Type"].startswith("application/json")
        return r.status, await r.json()


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ("{not json", 400, "invalid_json"),
        ("", 400, "invalid_json"),
        (b"\xff\xfe", 400, "invalid_json"),
        ("[1, 2]", 400, "invalid_json"),
        ("[" * 50000, 400, "invalid_json"),  # RecursionError in json: was a 500
        ('{"message": "\\ud800 hi"}', 400, "invalid_json"),  # lone surrogate: was a 500
        ('{"message": "hi", "session_id": "\\udfff"}', 400, "invalid_json"),
        ("{}", 400, "invalid_field"),
        ('{"message": 42}', 400, "invalid_field"),
        ('{"message": "hi", "session_id": 7}', 400, "invalid_field"),
        ('{"message": "hi", "colour": "red"}', 400, "invalid_field"),
        ('{"message": "hi", "temperature": -1}', 400, "invalid_parameter"),
        ('{"message": "hi", "max_tokens": 0}', 400, "invalid_parameter"),
        ('{"message": "hi", "max_tokens": 2.5}', 400, "invalid_parameter"),
        ('{"message": "hi", "top_k": true}', 400, "invalid_parameter"),
        ('{"message": "hi", "stop": ["a", 1]}', 400, "invalid_parameter"),
        ('{"message": "hi", "session_id": "nope"}', 404, "session_not_found"),
        (json.dumps({"message": TOO_LONG, "max_tokens": 4}), 400, "context_length_exceeded"),
        # Over 4096 tokens x 81 characters (the longest token): refused untokenized.
        (json.dumps({"message": "a" * 400_000}), 400, "context_length_exceeded"),
        ("x" * (MAX_BODY + 1), 413, "body_too_large"),
    ],
)
async def test_query_bad_input(
    http: aiohttp.ClientSession, server: ServerProcess, body: str | bytes, status: int, code: str
) -> None:
    got, error = await post(http, server.url + "/v1/query", body)
    assert got == status
    assert set(error["error"]) >= {"code", "message"} and error["error"]["code"] == code
    assert error["error"]["message"]


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ("{not json", 400, "invalid_json"),
        ('{"model": "m", "messages": ' + "[" * 50000, 400, "invalid_json"),
        (
            '{"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "\\ud800"}]}',
            400,
            "invalid_json",
        ),
        ('{"model": "SmolLM2-135M-Instruct", "messages": "hi"}', 400, "invalid_field"),
        ("x" * (MAX_BODY + 1), 413, "body_too_large"),
    ],
)
async def test_openai_bad_input_has_openai_shape(
    http: aiohttp.ClientSession, server: ServerProcess, body: str, status: int, code: str
) -> None:
    got, error = await post(http, server.url + "/v1/chat/completions", body)
    assert got == status
    assert set(error["error"]) == {"message", "type", "param", "code", "request_id"}
    assert error["error"]["code"] == code
    assert error["error"]["type"] == "invalid_request_error"


async def test_unknown_route_and_method(http: aiohttp.ClientSession, server: ServerProcess) -> None:
    async with http.get(server.url + "/no/such/route") as r:
        assert r.status == 404 and (await r.json())["error"]["code"] == "not_found"
    async with http.delete(server.url + "/v1/query") as r:
        assert r.status == 405 and (await r.json())["error"]["code"] == "method_not_allowed"
        assert "POST" in r.headers["Allow"]


async def recv(ws: Any) -> dict[str, Any]:
    return json.loads(await asyncio.wait_for(ws.recv(), 60))


def ws_url(server: ServerProcess) -> str:
    return server.url.replace("http://", "ws://") + "/ws"


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("{not json", "invalid_json"),
        ("[]", "invalid_frame"),
        ("[" * 50000, "invalid_json"),  # closed the socket before
        ('{"type": "chat", "content": "hi", "id": "\\ud800"}', "invalid_json"),  # hung it
        ('{"type": "chat", "content": "\\udc00"}', "invalid_json"),
        ('{"type": "subscribe"}', "unknown_type"),
        ('{"content": "hi"}', "invalid_field"),
        ('{"type": "chat"}', "invalid_field"),
        ('{"type": "chat", "content": ["hi"]}', "invalid_field"),
        ('{"type": "chat", "content": "hi", "id": 5}', "invalid_field"),
        ('{"type": "chat", "content": "hi", "params": {"top_p": 7}}', "invalid_parameter"),
        ('{"type": "chat", "content": "hi", "max_tokens": 4}', "invalid_field"),  # not params
        ('{"type": "chat", "content": "hi", "params": {"max_tokens": -1}}', "invalid_parameter"),
        ('{"type": "chat", "content": "hi", "session_id": "nope"}', "session_not_found"),
        (json.dumps({"type": "chat", "content": TOO_LONG}), "context_length_exceeded"),
        (json.dumps({"type": "chat", "content": "x" * MAX_FRAME}), "frame_too_large"),
        (b"\x00\x01binary", "unsupported_frame"),
    ],
)
async def test_ws_bad_frame_then_socket_still_answers(
    server: ServerProcess, frame: str | bytes, code: str
) -> None:
    async with websockets.connect(ws_url(server), max_size=None) as ws:
        await ws.send(frame)
        error = await recv(ws)
        assert error["type"] == "error" and error["code"] == code and error["message"]
        await ws.send(json.dumps({"type": "chat", "content": "Hi", "params": {"max_tokens": 4}}))
        while (reply := await recv(ws))["type"] != "done":
            assert reply["type"] in ("session", "token")


async def test_ws_keeps_answering_after_a_run_of_hostile_frames(server: ServerProcess) -> None:
    """The reported sequence: a lone-surrogate id, then deep nesting, then a valid chat."""
    async with websockets.connect(ws_url(server), max_size=None) as ws:
        for frame in ('{"type": "chat", "content": "hi", "id": "\\ud800"}', "[" * 50000):
            await ws.send(frame)
            assert (await recv(ws))["code"] == "invalid_json"
        await ws.send(
            json.dumps({"type": "chat", "id": "ok", "content": "Hi", "params": {"max_tokens": 4}})
        )
        while (reply := await recv(ws))["type"] != "done":
            assert reply["type"] in ("session", "token")
        assert reply["id"] == "ok"


async def test_ws_errors_carry_the_message_id(server: ServerProcess) -> None:
    async with websockets.connect(ws_url(server)) as ws:
        await ws.send(json.dumps({"type": "chat", "id": "q1", "content": ""}))
        assert (await recv(ws))["id"] == "q1"
        await ws.send(json.dumps({"type": "chat", "id": "q2", "content": TOO_LONG}))
        assert (await recv(ws))["id"] == "q2"


async def test_ws_frame_over_hard_cap_closes_socket(
    http: aiohttp.ClientSession, server: ServerProcess
) -> None:
    async with websockets.connect(ws_url(server), max_size=None) as ws:
        await ws.send("x" * (8 * MAX_FRAME))
        with pytest.raises(ConnectionClosed) as info:
            await recv(ws)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1009
    async with http.get(server.url + "/healthz") as r:
        assert r.status == 200
