"""chatserver.sessions: the memory and Redis stores, and Redis sessions across servers."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from chatserver.sessions import SessionStore, SessionStoreUnavailable
from chatserver.sessions.memory import MemorySessionStore
from chatserver.sessions.redis import RedisSessionStore
from tests.serverproc import ServerProcess

USER = {"role": "user", "content": "hi"}
ASSISTANT = {"role": "assistant", "content": "hello"}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    await client.aclose()


@pytest.fixture
async def redis_prefix(redis_client: aioredis.Redis) -> AsyncIterator[str]:
    """A key prefix of this test's own, deleted afterwards."""
    prefix = f"chatserver-test-{uuid.uuid4().hex[:8]}:"
    yield prefix
    keys = [k async for k in redis_client.scan_iter(match=prefix + "*")]
    if keys:
        await redis_client.delete(*keys)


@pytest.fixture(params=["memory", "redis"])
async def store(
    request: pytest.FixtureRequest, redis_url: str, redis_prefix: str
) -> AsyncIterator[SessionStore]:
    if request.param == "memory":
        s: SessionStore = MemorySessionStore(ttl=60)
    else:
        s = RedisSessionStore(redis_url, ttl=60, prefix=redis_prefix)
    yield s
    await s.close()


async def test_create_append_read_delete(store: SessionStore) -> None:
    sid = await store.create()
    assert await store.exists(sid)
    assert await store.messages(sid) == []
    assert await store.append_turn(sid, USER, ASSISTANT)
    cancelled = {"role": "assistant", "content": "hel", "cancelled": True}
    assert await store.append_turn(sid, {"role": "user", "content": "again"}, cancelled)
    assert await store.messages(sid) == [
        USER,
        ASSISTANT,
        {"role": "user", "content": "again"},
        cancelled,
    ]
    assert await store.delete(sid)
    assert not await store.exists(sid)
    assert await store.messages(sid) is None
    assert not await store.delete(sid)


async def test_unknown_and_malformed_ids(store: SessionStore) -> None:
    sid = await store.create()
    for bad in ("nope", "", sid + ":messages", "../" + sid, "x" * 500):
        assert not await store.exists(bad)
        assert await store.messages(bad) is None
        assert not await store.append_turn(bad, USER, ASSISTANT)
        assert not await store.delete(bad)
    assert await store.messages(sid) == []


async def test_append_to_deleted_session_stores_nothing(store: SessionStore) -> None:
    sid = await store.create()
    await store.delete(sid)
    assert not await store.append_turn(sid, USER, ASSISTANT)
    assert await store.messages(sid) is None


async def test_concurrent_appends_keep_turns_whole(store: SessionStore) -> None:
    sid = await store.create()
    turns = [
        ({"role": "user", "content": f"u{i}"}, {"role": "assistant", "content": f"a{i}"})
        for i in range(20)
    ]
    await asyncio.gather(*(store.append_turn(sid, u, a) for u, a in turns))
    messages = await store.messages(sid)
    assert messages is not None and len(messages) == 40
    for user, assistant in zip(messages[::2], messages[1::2], strict=True):
        assert user["content"][1:] == assistant["content"][1:]


async def test_memory_ttl_expires_and_use_refreshes() -> None:
    clock = Clock()
    store = MemorySessionStore(ttl=10, clock=clock)
    kept, dropped = await store.create(), await store.create()
    clock.now += 8
    assert await store.exists(kept)
    clock.now += 8  # 16 s after creation, 8 s after `kept` was last used
    assert await store.messages(kept) == []
    assert not await store.exists(dropped)
    assert len(store) == 1
    clock.now += 11
    assert not await store.append_turn(kept, USER, ASSISTANT)
    assert len(store) == 0


async def test_redis_ttl_refreshed_on_use(
    redis_url: str, redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    store = RedisSessionStore(redis_url, ttl=100, prefix=redis_prefix)
    try:
        sid = await store.create()
        meta = f"{redis_prefix}session:{sid}"
        await store.append_turn(sid, USER, ASSISTANT)
        await redis_client.expire(meta, 5)
        await redis_client.expire(meta + ":messages", 5)
        assert await store.messages(sid) == [USER, ASSISTANT]
        assert 90 < await redis_client.ttl(meta) <= 100
        assert 90 < await redis_client.ttl(meta + ":messages") <= 100
        await redis_client.pexpire(meta, 1)
        await asyncio.sleep(0.05)
        assert not await store.exists(sid)
        assert await store.messages(sid) is None
    finally:
        await store.close()


async def test_redis_unreachable_is_a_clear_error() -> None:
    store = RedisSessionStore("redis://127.0.0.1:1/0", ttl=10)
    try:
        with pytest.raises(SessionStoreUnavailable):
            await store.create()
    finally:
        await store.close()


# --- Redis sessions across server processes ---------------------------------------


async def http_json(
    http: aiohttp.ClientSession, method: str, url: str, **kwargs: Any
) -> tuple[int, Any]:
    async with http.request(method, url, **kwargs) as r:
        return r.status, (await r.json() if r.status != 204 else None)


async def test_redis_sessions_survive_restart_and_are_shared(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    flags = ("--redis-url", redis_url, "--log-level", "warning")
    sid = ""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
        try:
            first = ServerProcess(*flags)
            try:
                await asyncio.to_thread(first.wait_ready)
                status, body = await http_json(
                    http,
                    "POST",
                    first.url + "/v1/query",
                    json={"message": "The secret word is banana.", "max_tokens": 16},
                )
                assert status == 200
                sid = body["session_id"]
            finally:
                first.stop()

            # Two new servers on the same Redis: the session outlived its server...
            a, b = ServerProcess(*flags), ServerProcess(*flags)
            try:
                await asyncio.gather(
                    asyncio.to_thread(a.wait_ready), asyncio.to_thread(b.wait_ready)
                )
                status, session = await http_json(http, "GET", f"{a.url}/v1/sessions/{sid}")
                assert status == 200 and len(session["messages"]) == 2
                # ...and both servers share it: a turn through b is seen by a.
                status, body = await http_json(
                    http,
                    "POST",
                    b.url + "/v1/query",
                    json={
                        "message": "What is the secret word?",
                        "session_id": sid,
                        "max_tokens": 16,
                    },
                )
                assert status == 200 and "banana" in body["reply"].lower()
                status, session = await http_json(http, "GET", f"{a.url}/v1/sessions/{sid}")
                assert [m["role"] for m in session["messages"]] == ["user", "assistant"] * 2
                assert session["messages"][3]["content"] == body["reply"]
                async with http.ws_connect(f"{a.url}/ws?session_id={sid}") as ws:
                    assert await ws.receive_json(timeout=30) == {
                        "type": "session",
                        "session_id": sid,
                    }
                assert (await http_json(http, "DELETE", f"{b.url}/v1/sessions/{sid}"))[0] == 204
                assert (await http_json(http, "GET", f"{a.url}/v1/sessions/{sid}"))[0] == 404
            finally:
                a.stop()
                b.stop()
        finally:
            if sid:
                await redis_client.delete(
                    f"chatserver:session:{sid}", f"chatserver:session:{sid}:messages"
                )


def test_unreachable_redis_fails_at_startup() -> None:
    proc = ServerProcess("--redis-url", "redis://127.0.0.1:1/0")
    try:
        assert proc.proc.wait(60) != 0
        assert "check --redis-url" in proc.log()
    finally:
        proc.stop()
