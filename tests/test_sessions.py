"""chatserver.sessions: the memory and Redis stores, and Redis sessions across servers."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from chatserver.sessions import SessionBusy, SessionStore, SessionStoreUnavailable
from chatserver.sessions.base import InvalidCursor, valid_session_id
from chatserver.sessions.memory import MemorySessionStore
from chatserver.sessions.redis import RedisSessionStore
from tests.serverproc import ServerProcess

OWNER = "0123456789abcdef0123456789abcdef"
OTHER = "fedcba9876543210fedcba9876543210"
USER = {"role": "user", "content": "hi"}
ASSISTANT = {"role": "assistant", "content": "hello"}


class _AnyInt:
    def __eq__(self, other: object) -> bool:
        return isinstance(other, int)


ANY_INT = _AnyInt()


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
    sid = await store.create(owner=OWNER)
    assert await store.exists(sid, owner=OWNER)
    assert await store.messages(sid, owner=OWNER) == []
    assert await store.append_turn(sid, USER, ASSISTANT, owner=OWNER)
    cancelled = {"role": "assistant", "content": "hel", "cancelled": True}
    assert await store.append_turn(
        sid, {"role": "user", "content": "again"}, cancelled, owner=OWNER
    )
    assert await store.messages(sid, owner=OWNER) == [
        USER,
        ASSISTANT,
        {"role": "user", "content": "again"},
        cancelled,
    ]
    assert await store.delete(sid, owner=OWNER)
    assert not await store.exists(sid, owner=OWNER)
    assert await store.messages(sid, owner=OWNER) is None
    assert not await store.delete(sid, owner=OWNER)


async def test_a_turn_of_tool_results_is_stored_whole(store: SessionStore) -> None:
    """Tool calling (/ws): an assistant message with calls, then a turn that opens
    with the calls' results instead of a user message."""
    sid = await store.create(owner=OWNER)
    calls = [
        {"id": "call_1", "name": "f", "arguments": "{}"},
        {"id": "call_2", "name": "f", "arguments": '{"x": 1}'},
    ]
    with_calls = {
        "role": "assistant",
        "content": "",
        "tool_calls": calls,
        "tools": [{"type": "function", "function": {"name": "f"}}],
        "parallel_tool_calls": True,
    }
    assert await store.append_turn(sid, USER, with_calls, owner=OWNER)
    answers = [
        {"role": "tool", "tool_call_id": c["id"], "content": f"r{i}"} for i, c in enumerate(calls)
    ]
    reply = {"role": "assistant", "content": "Done."}
    assert await store.append_turn(sid, answers, reply, owner=OWNER)
    assert await store.messages(sid, owner=OWNER) == [USER, with_calls, *answers, reply]
    assert not await store.append_turn("0" * 32, answers, reply, owner=OWNER)


async def test_unknown_and_malformed_ids(store: SessionStore) -> None:
    sid = await store.create(owner=OWNER)
    for bad in ("nope", "", sid + ":messages", "../" + sid, "x" * 500):
        assert not await store.exists(bad, owner=OWNER)
        assert await store.messages(bad, owner=OWNER) is None
        assert not await store.append_turn(bad, USER, ASSISTANT, owner=OWNER)
        assert not await store.delete(bad, owner=OWNER)
    assert await store.messages(sid, owner=OWNER) == []


async def test_append_to_deleted_session_stores_nothing(store: SessionStore) -> None:
    sid = await store.create(owner=OWNER)
    await store.delete(sid, owner=OWNER)
    assert not await store.append_turn(sid, USER, ASSISTANT, owner=OWNER)
    assert await store.messages(sid, owner=OWNER) is None


async def test_concurrent_appends_keep_turns_whole(store: SessionStore) -> None:
    sid = await store.create(owner=OWNER)
    turns = [
        ({"role": "user", "content": f"u{i}"}, {"role": "assistant", "content": f"a{i}"})
        for i in range(20)
    ]
    await asyncio.gather(*(store.append_turn(sid, u, a, owner=OWNER) for u, a in turns))
    messages = await store.messages(sid, owner=OWNER)
    assert messages is not None and len(messages) == 40
    for user, assistant in zip(messages[::2], messages[1::2], strict=True):
        assert user["content"][1:] == assistant["content"][1:]


async def test_session_ids_are_128_random_bits() -> None:
    store = MemorySessionStore(ttl=60)
    ids = {await store.create(owner=OWNER) for _ in range(200)}
    assert len(ids) == 200
    for sid in ids:
        assert valid_session_id(sid) and len(sid) == 32 and int(sid, 16) >= 0
    # uuid4 hex fixes the version nibble (index 12) to 4; random bits do not.
    assert len({sid[12] for sid in ids}) > 1


async def test_another_owners_session_is_unknown(store: SessionStore) -> None:
    sid = await store.create(owner=OWNER)
    assert await store.append_turn(sid, USER, ASSISTANT, owner=OWNER)
    for owner in (OTHER, ""):
        assert not await store.exists(sid, owner=owner)
        assert await store.messages(sid, owner=owner) is None
        assert not await store.append_turn(sid, USER, ASSISTANT, owner=owner)
        assert not await store.delete(sid, owner=owner)
        assert (await store.list_sessions(owner=owner, limit=10)).sessions == []
    assert await store.messages(sid, owner=OWNER) == [USER, ASSISTANT]
    assert [s.session_id for s in (await store.list_sessions(owner=OWNER, limit=10)).sessions] == [
        sid
    ]


async def list_all(store: SessionStore, owner: str, limit: int) -> list[str]:
    """Every id of owner's listing, page by page."""
    ids: list[str] = []
    cursor = None
    while True:
        page = await store.list_sessions(owner=owner, limit=limit, cursor=cursor)
        assert len(page.sessions) <= limit
        ids += [s.session_id for s in page.sessions]
        if page.next_cursor is None:
            return ids
        assert len(page.sessions) == limit
        cursor = page.next_cursor


async def test_listing_pages_through_own_sessions_most_recent_first(store: SessionStore) -> None:
    mine = []
    for _ in range(7):
        mine.append(await store.create(owner=OWNER))
        await store.create(owner=OTHER)
        await asyncio.sleep(0.002)  # distinct last-use times
    await store.messages(mine[2], owner=OWNER)  # used last: listed first
    expected = [mine[2], *[sid for sid in reversed(mine) if sid != mine[2]]]
    for limit in (1, 3, 7, 100):
        assert await list_all(store, OWNER, limit) == expected
    page = await store.list_sessions(owner=OWNER, limit=3)
    assert page.sessions[0].created > 1_700_000_000
    assert page.sessions[0].last_used >= page.sessions[1].last_used
    await store.delete(mine[5], owner=OWNER)
    rest = await store.list_sessions(owner=OWNER, limit=3, cursor=page.next_cursor)
    assert [s.session_id for s in rest.sessions] == [mine[4], mine[3], mine[1]]
    for bad in ("nope", "e30", "W10", "!!"):
        with pytest.raises(InvalidCursor):
            await store.list_sessions(owner=OWNER, limit=3, cursor=bad)


async def test_memory_ttl_expires_and_use_refreshes() -> None:
    clock = Clock()
    store = MemorySessionStore(ttl=10, clock=clock)
    kept, dropped = await store.create(owner=OWNER), await store.create(owner=OWNER)
    clock.now += 8
    assert await store.exists(kept, owner=OWNER)
    clock.now += 8  # 16 s after creation, 8 s after `kept` was last used
    assert await store.messages(kept, owner=OWNER) == []
    assert not await store.exists(dropped, owner=OWNER)
    assert len(store) == 1
    clock.now += 11
    assert not await store.append_turn(kept, USER, ASSISTANT, owner=OWNER)
    assert len(store) == 0


async def test_redis_ttl_refreshed_on_use(
    redis_url: str, redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    store = RedisSessionStore(redis_url, ttl=100, prefix=redis_prefix)
    try:
        sid = await store.create(owner=OWNER)
        meta = f"{redis_prefix}session:{sid}"
        await store.append_turn(sid, USER, ASSISTANT, owner=OWNER)
        await redis_client.expire(meta, 5)
        await redis_client.expire(meta + ":messages", 5)
        assert await store.messages(sid, owner=OWNER) == [USER, ASSISTANT]
        assert 90 < await redis_client.ttl(meta) <= 100
        assert 90 < await redis_client.ttl(meta + ":messages") <= 100
        await redis_client.pexpire(meta, 1)
        await asyncio.sleep(0.05)
        assert not await store.exists(sid, owner=OWNER)
        assert await store.messages(sid, owner=OWNER) is None
    finally:
        await store.close()


async def test_redis_owner_index_drops_gone_sessions_and_expires(
    redis_url: str, redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    store = RedisSessionStore(redis_url, ttl=100, prefix=redis_prefix)
    try:
        kept, expired = await store.create(owner=OWNER), await store.create(owner=OWNER)
        index = f"{redis_prefix}owner:{OWNER}:sessions"
        assert await redis_client.zcard(index) == 2
        assert 90 < await redis_client.ttl(index) <= 100
        assert json.loads(await redis_client.get(f"{redis_prefix}session:{kept}")) == {
            "created": ANY_INT,
            "owner": OWNER,
        }
        await redis_client.delete(f"{redis_prefix}session:{expired}")  # as if its TTL ran out
        page = await store.list_sessions(owner=OWNER, limit=10)
        assert [s.session_id for s in page.sessions] == [kept]
        assert await redis_client.zrange(index, 0, -1) == [kept]
        await redis_client.zadd(index, {"stale": 1.0})  # unused for longer than the TTL
        await store.exists(kept, owner=OWNER)
        assert await redis_client.zrange(index, 0, -1) == [kept]
    finally:
        await store.close()


def turn(i: int) -> tuple[dict[str, str], dict[str, str]]:
    return {"role": "user", "content": f"u{i}"}, {"role": "assistant", "content": f"a{i}"}


@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_history_cap_drops_oldest_turns_a_quarter_at_once(
    kind: str, redis_url: str, redis_prefix: str
) -> None:
    """--max-history-messages 8: up to 8 kept; past it the newest 6 (three quarters)."""
    if kind == "memory":
        store: SessionStore = MemorySessionStore(ttl=60, max_messages=8)
    else:
        store = RedisSessionStore(redis_url, ttl=60, prefix=redis_prefix, max_messages=8)
    try:
        sid = await store.create(owner=OWNER)
        kept = []
        for i in range(7):
            assert await store.append_turn(sid, *turn(i), owner=OWNER)
            kept.append([m["content"] for m in await store.messages(sid, owner=OWNER)])
        assert kept[3] == ["u0", "a0", "u1", "a1", "u2", "a2", "u3", "a3"]
        assert kept[4] == ["u2", "a2", "u3", "a3", "u4", "a4"]  # 10 > 8: the oldest 2 turns go
        assert kept[5] == ["u2", "a2", "u3", "a3", "u4", "a4", "u5", "a5"]  # the start stays
        assert kept[6] == ["u4", "a4", "u5", "a5", "u6", "a6"]
    finally:
        await store.close()


async def test_no_history_cap_keeps_everything(store: SessionStore) -> None:
    sid = await store.create(owner=OWNER)
    for i in range(150):
        assert await store.append_turn(sid, *turn(i), owner=OWNER)
    assert len(await store.messages(sid, owner=OWNER)) == 300


async def test_turn_lock_runs_a_sessions_turns_one_at_a_time(store: SessionStore) -> None:
    sid, other = await store.create(owner=OWNER), await store.create(owner=OWNER)
    events: list[str] = []

    async def one_turn(name: str, session: str, hold: float) -> None:
        async with store.turn_lock(session, wait=10):
            events.append(f"{name} in")
            await asyncio.sleep(hold)
            events.append(f"{name} out")

    first = asyncio.create_task(one_turn("first", sid, 0.3))
    await asyncio.sleep(0.05)
    # Another session is not held up; the same session waits its turn, in order.
    await asyncio.gather(
        one_turn("second", sid, 0.0), one_turn("third", sid, 0.0), one_turn("x", other, 0.0)
    )
    await first
    assert events == [
        "first in",
        "x in",
        "x out",
        "first out",
        "second in",
        "second out",
        "third in",
        "third out",
    ]


async def test_turn_lock_wait_is_bounded_and_can_be_given_up(store: SessionStore) -> None:
    sid = await store.create(owner=OWNER)
    async with store.turn_lock(sid, wait=1):
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(SessionBusy):
            async with store.turn_lock(sid, wait=0.2):
                pytest.fail("entered a held session")
        assert 0.2 <= loop.time() - started < 1.0
        waiter = asyncio.create_task(store.turn_lock(sid, wait=None).__aenter__())
        await asyncio.sleep(0.1)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
    # Neither the timed-out nor the cancelled waiter kept anything: the session is free.
    async with asyncio.timeout(1):
        async with store.turn_lock(sid, wait=0.5):
            pass


async def test_redis_turn_lock_holds_across_servers_and_outlives_its_ttl(
    redis_url: str, redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    """Two stores on one Redis (two servers): one turn at a time, however long it runs."""
    # A TTL of 1.5 s, renewed every 0.5 s: the lock only lapses if this test's loop
    # stalls for a second, which a 0.3 s TTL once did on a busy CI machine.
    a = RedisSessionStore(redis_url, ttl=60, prefix=redis_prefix, lock_ttl=1.5)
    b = RedisSessionStore(redis_url, ttl=60, prefix=redis_prefix, lock_ttl=1.5)
    try:
        sid = await a.create(owner=OWNER)
        lock_key = f"{redis_prefix}session:{sid}:lock"
        events: list[str] = []
        async with a.turn_lock(sid, wait=10):
            assert 0 < await redis_client.pttl(lock_key) <= 1500
            waiter = asyncio.create_task(held(b, sid, events))
            await asyncio.sleep(3.5)  # more than twice the lock's TTL: renewed meanwhile
            assert events == [] and 0 < await redis_client.pttl(lock_key) <= 1500
            events.append("a out")
        await asyncio.wait_for(waiter, 5)
        assert events == ["a out", "b in"]
        assert not await redis_client.exists(lock_key)
    finally:
        await a.close()
        await b.close()


async def held(store: SessionStore, sid: str, events: list[str]) -> None:
    async with store.turn_lock(sid, wait=10):
        events.append("b in")


async def test_redis_turn_lock_of_a_vanished_server_expires_and_is_never_stolen(
    redis_url: str, redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    store = RedisSessionStore(redis_url, ttl=60, prefix=redis_prefix)
    try:
        sid = await store.create(owner=OWNER)
        lock_key = f"{redis_prefix}session:{sid}:lock"
        # A server died holding the lock: it is free once its expiry passes.
        await redis_client.set(lock_key, "dead-server", px=400)
        loop = asyncio.get_running_loop()
        started = loop.time()
        async with store.turn_lock(sid, wait=5):
            assert loop.time() - started >= 0.3
            # Our lock expired and another server took it: leaving must not free theirs.
            await redis_client.set(lock_key, "next-holder", px=5000)
        assert await redis_client.get(lock_key) == "next-holder"
    finally:
        await store.close()


async def test_redis_unreachable_is_a_clear_error() -> None:
    store = RedisSessionStore("redis://127.0.0.1:1/0", ttl=10)
    try:
        with pytest.raises(SessionStoreUnavailable):
            await store.create(owner=OWNER)
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
    """A session outlives the server that held it: another server on the same Redis,
    which knew nothing of it, continues it. (Two live servers taking turns on one
    session: test_chat_serving.py.)"""
    flags = ("--redis-url", redis_url, "--skip-quality-gate", "--log-level", "warning")
    sid = ""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
        # The server that outlives the first starts beside it, not after it (when this
        # test had three servers: 20.5 s against 13.1 s, 2-core AMD EPYC, torch
        # capability AVX512); it knows nothing of its sessions but what Redis holds.
        after = ServerProcess(*flags)
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

            await asyncio.to_thread(after.wait_ready)
            status, session = await http_json(http, "GET", f"{after.url}/v1/sessions/{sid}")
            assert status == 200 and len(session["messages"]) == 2
            status, body = await http_json(
                http,
                "POST",
                after.url + "/v1/query",
                json={
                    "message": "What is the secret word?",
                    "session_id": sid,
                    "max_tokens": 16,
                },
            )
            assert status == 200 and "banana" in body["reply"].lower()
            status, session = await http_json(http, "GET", f"{after.url}/v1/sessions/{sid}")
            assert [m["role"] for m in session["messages"]] == ["user", "assistant"] * 2
            assert session["messages"][3]["content"] == body["reply"]
            async with http.ws_connect(f"{after.url}/ws?session_id={sid}") as ws:
                assert await ws.receive_json(timeout=30) == {
                    "type": "session",
                    "session_id": sid,
                }
            assert await redis_client.exists(f"chatserver:session:{sid}") == 1
            assert (await http_json(http, "DELETE", f"{after.url}/v1/sessions/{sid}"))[0] == 204
            assert await redis_client.exists(f"chatserver:session:{sid}") == 0
            assert (await http_json(http, "GET", f"{after.url}/v1/sessions/{sid}"))[0] == 404
        finally:
            after.stop()
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


class PrivateRedis:
    """A redis-server of the test's own, which it can stall (SIGSTOP) and resume."""

    def __init__(self, tmp_path: Any) -> None:
        import shutil
        import socket
        import subprocess

        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not installed (.ci/ensure-redis.sh installs it)")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc = subprocess.Popen(
            [binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", ""]
            + ["--appendonly", "no", "--dir", str(tmp_path)],
            stdout=subprocess.DEVNULL,
        )
        self.url = f"redis://127.0.0.1:{self.port}/0"

    async def wait(self) -> None:
        client = aioredis.Redis.from_url(self.url)
        try:
            for _ in range(100):
                try:
                    if await client.ping():
                        return
                except (OSError, RedisError):
                    await asyncio.sleep(0.05)
        finally:
            await client.aclose()
        raise AssertionError("private redis-server did not start")

    def stall(self) -> None:
        import signal

        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        import signal

        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        self.resume()
        self.proc.terminate()
        self.proc.wait(10)


async def test_a_stalled_redis_fails_fast_and_a_delivered_reply_says_unstored(tmp_path) -> None:
    redis_server = PrivateRedis(tmp_path)
    try:
        await redis_server.wait()
        proc = ServerProcess(
            "--redis-url", redis_server.url, "--redis-timeout", "0.5",
            "--skip-quality-gate", "--log-level", "warning",
        ).wait_ready()  # fmt: skip
        try:
            async with aiohttp.ClientSession() as http:

                async def query(body: dict) -> tuple[int, dict, float]:
                    started = asyncio.get_running_loop().time()
                    async with http.post(proc.url + "/v1/query", json=body) as resp:
                        elapsed = asyncio.get_running_loop().time() - started
                        return resp.status, await resp.json(), elapsed

                status, first, _ = await query({"message": "Hi", "max_tokens": 4})
                assert status == 200 and first["stored"] is True
                session = first["session_id"]
                # Redis stalls while a reply is being generated: the reply still
                # arrives, saying it was not stored. 240 tokens outlast the sleep at
                # any speed (48 ended inside it at int4's 155 tok/s on the AVX-512 EPYC).
                story = {"message": "Tell me a story.", "session_id": session}
                reply = asyncio.create_task(query({**story, "max_tokens": 240, "ignore_eos": True}))
                await asyncio.sleep(0.3)  # its history is read; it is generating
                redis_server.stall()
                status, body, _ = await reply
                assert status == 200, body
                assert body["reply"] and body["stored"] is False
                # While stalled, a turn needing the history fails fast and clearly.
                status, body, elapsed = await query(
                    {"message": "Hi", "session_id": session, "max_tokens": 8}
                )
                assert status == 503 and body["error"]["code"] == "session_store_unavailable"
                assert elapsed < 5, elapsed
                async with http.get(proc.url + "/healthz") as resp:
                    assert resp.status == 200
                redis_server.resume()
                status, body, elapsed = await query(
                    {"message": "Hi", "session_id": session, "max_tokens": 8}
                )
                assert status == 200 and body["stored"] is True
                # The story's turn lock, which the stalled Redis did not take back, is
                # given back once Redis answers, not when it expires (LOCK_TTL_S, 10 s).
                assert elapsed < 5, elapsed
                async with http.get(f"{proc.url}/v1/sessions/{session}") as resp:
                    turns = [m["content"] for m in (await resp.json())["messages"]]
                assert turns[:2] == ["Hi", first["reply"]] and len(turns) == 4  # not the story
        finally:
            proc.stop()
    finally:
        redis_server.stop()
