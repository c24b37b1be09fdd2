"""chatserver.api.chat: POST /v1/query and /v1/sessions/{id} over a real HTTP client."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from chatserver.api.chat.protocol import parse_query
from chatserver.errors import ApiError
from tests.serverproc import ServerProcess, generations, wait_no_generations


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        yield session


async def query(
    http: aiohttp.ClientSession, server: ServerProcess, **body: Any
) -> tuple[int, dict[str, Any]]:
    async with http.post(f"{server.url}/v1/query", json=body) as r:
        return r.status, await r.json()


def test_parse_query() -> None:
    q = parse_query({"message": "hi", "session_id": "s", "max_tokens": 3, "stop": "x"})
    assert (q.message, q.session_id, q.params.max_tokens, q.params.stop) == ("hi", "s", 3, ("x",))
    for bad, param in [
        ({}, "message"),
        ({"message": 3}, "message"),
        ({"message": "hi", "session_id": 3}, "session_id"),
        ({"message": "hi", "max_token": 3}, "max_token"),
        ({"message": "hi", "top_p": 2}, "top_p"),
    ]:
        with pytest.raises(ApiError) as info:
            parse_query(bad)
        assert (info.value.status, info.value.param) == (400, param)


async def test_query_creates_session_and_replies(
    http: aiohttp.ClientSession, server: ServerProcess
) -> None:
    status, body = await query(http, server, message="Say hello.", max_tokens=8)
    assert status == 200
    assert set(body) == {"session_id", "reply", "finish_reason", "usage", "stored"}
    assert body["stored"] is True
    assert body["reply"] and body["finish_reason"] in ("stop", "length")
    assert body["usage"]["prompt_tokens"] > 5
    assert 0 < body["usage"]["completion_tokens"] <= 8


async def test_session_history_across_queries(
    http: aiohttp.ClientSession, server: ServerProcess
) -> None:
    _, first = await query(http, server, message="The secret word is banana.", max_tokens=16)
    sid = first["session_id"]
    status, second = await query(
        http, server, message="What is the secret word?", session_id=sid, max_tokens=16
    )
    assert status == 200 and second["session_id"] == sid
    assert "banana" in second["reply"].lower()
    async with http.get(f"{server.url}/v1/sessions/{sid}") as r:
        assert r.status == 200
        assert await r.json() == {
            "session_id": sid,
            "messages": [
                {"role": "user", "content": "The secret word is banana."},
                {"role": "assistant", "content": first["reply"]},
                {"role": "user", "content": "What is the secret word?"},
                {"role": "assistant", "content": second["reply"]},
            ],
        }


async def test_stop_string_ends_reply(
    http: aiohttp.ClientSession, exact_server: ServerProcess
) -> None:
    # The exact server: the second prompt reuses the first one's cached prefix, and the
    # default kernels' greedy text may differ with how a prompt splits into cached and
    # computed parts.
    _, free = await query(http, exact_server, message="List three fruits.", max_tokens=32)
    status, stopped = await query(
        http, exact_server, message="List three fruits.", max_tokens=32, stop="\n"
    )
    assert "\n" in free["reply"]
    assert status == 200 and stopped["finish_reason"] == "stop"
    assert stopped["reply"] == free["reply"].split("\n")[0]


async def test_unknown_session(http: aiohttp.ClientSession, server: ServerProcess) -> None:
    status, body = await query(http, server, message="hi", session_id="nope")
    assert status == 404 and body["error"]["code"] == "session_not_found"
    async with http.get(f"{server.url}/v1/sessions/nope") as r:
        assert r.status == 404 and (await r.json())["error"]["code"] == "session_not_found"


async def test_delete_session(http: aiohttp.ClientSession, server: ServerProcess) -> None:
    _, body = await query(http, server, message="Hi", max_tokens=4)
    url = f"{server.url}/v1/sessions/{body['session_id']}"
    async with http.delete(url) as r:
        assert r.status == 204
    async with http.get(url) as r:
        assert r.status == 404
    async with http.delete(url) as r:
        assert r.status == 404 and (await r.json())["error"]["code"] == "session_not_found"


async def test_client_disconnect_mid_query(
    http: aiohttp.ClientSession, server: ServerProcess
) -> None:
    """A client that gives up cancels its generation; the server keeps serving."""
    request = asyncio.create_task(query(http, server, message="Count to 500.", max_tokens=1000))
    for _ in range(600):
        if await generations(server):
            break
        await asyncio.sleep(0.05)
    request.cancel()  # closes the connection
    await wait_no_generations(server)
    status, body = await query(http, server, message="Say yes.", max_tokens=8)
    assert status == 200 and body["finish_reason"] in ("stop", "length")
