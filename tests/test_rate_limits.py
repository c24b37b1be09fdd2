"""chatserver.limits.rate: the per-client limiters alone (memory, and the Lua scripts
in a real Redis), then the 429 answers of real servers, alone and two sharing a Redis."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import openai
import pytest
import redis.asyncio as aioredis

from chatserver.config import Settings
from chatserver.limits.rate import (
    REQUESTS,
    TOKENS,
    MemoryRateLimiter,
    RateLimited,
    RateLimiter,
    RedisRateLimiter,
    open_rate_limiter,
)
from tests.serverproc import ServerProcess, delete_redis_keys, open_ws

MODEL = "SmolLM2-135M-Instruct"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def refused(limiter: RateLimiter, client: str = "c") -> RateLimited:
    with pytest.raises(RateLimited) as info:
        await limiter.admit(client)
    return info.value


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    await client.aclose()


async def delete_prefix(client: aioredis.Redis, prefix: str) -> None:
    keys = [k async for k in client.scan_iter(match=prefix + "*")]
    if keys:
        await client.delete(*keys)


@pytest.fixture
async def redis_prefix(redis_client: aioredis.Redis) -> AsyncIterator[str]:
    """A key prefix of this test's own on the shared test db, deleted afterwards."""
    prefix = f"chatserver-test-{uuid.uuid4().hex[:8]}:"
    yield prefix
    await delete_prefix(redis_client, prefix)


# --- the memory limiter, on a clock the test moves ----------------------------------


async def test_memory_burst_then_retry_after_from_the_bucket() -> None:
    clock = Clock()
    limiter = MemoryRateLimiter(3, 0, clock=clock)
    for _ in range(3):
        await limiter.admit("c")
    err = await refused(limiter)
    assert (err.limit, err.per_minute) == (REQUESTS, 3)
    assert err.retry_after == pytest.approx(20.0)  # one request refills every 60/3 s
    clock.now += 15
    assert (await refused(limiter)).retry_after == pytest.approx(5.0)
    clock.now += 5
    await limiter.admit("c")
    assert (await refused(limiter)).retry_after == pytest.approx(20.0)
    await limiter.admit("another client")  # each client has its own bucket


async def test_memory_tokens_are_a_debt_paid_back_at_the_rate() -> None:
    clock = Clock()
    limiter = MemoryRateLimiter(0, 20, clock=clock)
    await limiter.admit("c")
    await limiter.charge_tokens("c", 30)  # a reply may overshoot: 20 - 30 = -10 left
    err = await refused(limiter)
    assert (err.limit, err.per_minute) == (TOKENS, 20)
    assert err.retry_after == pytest.approx(33.0)  # back to 1 token at 20 per 60 s
    clock.now += 33
    await limiter.admit("c")


async def test_memory_reports_the_longer_wait_when_both_limits_trip() -> None:
    clock = Clock()
    limiter = MemoryRateLimiter(1, 10, clock=clock)
    await limiter.admit("c")
    await limiter.charge_tokens("c", 10)
    err = await refused(limiter)
    assert (err.limit, err.retry_after) == (REQUESTS, pytest.approx(60.0))
    await limiter.charge_tokens("c", 20)
    err = await refused(limiter)
    assert (err.limit, err.retry_after) == (TOKENS, pytest.approx(126.0))


async def test_memory_idle_clients_leave_nothing() -> None:
    clock = Clock()
    limiter = MemoryRateLimiter(3, 100, clock=clock)
    for client in ("a", "b", "c"):
        await limiter.admit(client)
    await limiter.charge_tokens("c", 150)  # c owes tokens: its bucket refills later
    assert len(limiter) == 3
    clock.now += 61
    await limiter.admit("d")
    assert len(limiter) == 2  # a and b are full again and forgotten; c still owes
    clock.now += 90
    await limiter.admit("d")
    assert len(limiter) == 1


async def test_no_limits_means_no_limiter_state() -> None:
    limiter = open_rate_limiter(Settings.from_env(redis_url="redis://127.0.0.1:1/0"))
    assert not limiter.enabled
    for _ in range(100):
        await limiter.admit("c")
    await limiter.charge_tokens("c", 10**6)


# --- both backends, real time -------------------------------------------------------


@pytest.fixture(params=["memory", "redis"])
async def make_limiter(
    request: pytest.FixtureRequest, redis_url: str, redis_prefix: str
) -> AsyncIterator[Any]:
    made: list[RateLimiter] = []

    def make(rpm: int, tpm: int) -> RateLimiter:
        if request.param == "memory":
            limiter: RateLimiter = MemoryRateLimiter(rpm, tpm)
        else:
            limiter = RedisRateLimiter(redis_url, rpm, tpm, prefix=redis_prefix)
        made.append(limiter)
        return limiter

    yield make
    for limiter in made:
        await limiter.close()


async def test_refused_until_the_bucket_refills(make_limiter: Any) -> None:
    limiter = make_limiter(60, 0)  # one request a second
    for _ in range(60):
        await limiter.admit("c")
    first = await refused(limiter)
    assert 0.5 < first.retry_after <= 1.0
    await asyncio.sleep(0.3)
    later = await refused(limiter)
    assert later.retry_after < first.retry_after - 0.25  # computed from the state, not fixed
    await asyncio.sleep(later.retry_after + 0.05)
    await limiter.admit("c")  # just past the boundary: one more
    await refused(limiter)  # and not two
    await limiter.admit("d")


async def test_token_budget_spent_by_a_reply(make_limiter: Any) -> None:
    limiter = make_limiter(0, 10)
    await limiter.admit("c")
    await limiter.charge_tokens("c", 4)
    await limiter.admit("c")  # 6 tokens left: still in budget
    await limiter.charge_tokens("c", 12)
    err = await refused(limiter)
    assert err.limit == TOKENS
    assert 41 < err.retry_after <= 42  # from -6 back to 1 token at 10 per minute


# --- the Lua scripts' keys in a real Redis ------------------------------------------


async def test_redis_keys_expire_once_the_bucket_would_be_full(
    redis_url: str, redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    limiter = RedisRateLimiter(redis_url, 120, 0, prefix=redis_prefix)
    try:
        await limiter.admit("c")
        key = f"{redis_prefix}ratelimit:c"
        assert key == limiter.key("c")
        assert set(await redis_client.hgetall(key)) == {"req", "tok", "at"}
        assert 0 < await redis_client.pttl(key) <= 1500  # full again 0.5 s later, + 1 s margin
        await asyncio.sleep(1.6)
        assert not await redis_client.exists(key)  # an idle client leaves nothing behind
    finally:
        await limiter.close()


async def test_redis_key_ttl_covers_a_token_debt(
    redis_url: str, redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    limiter = RedisRateLimiter(redis_url, 3, 60, prefix=redis_prefix)
    try:
        await limiter.admit("c")
        assert 19_000 < await redis_client.pttl(limiter.key("c")) <= 21_000
        await limiter.charge_tokens("c", 120)  # from 60 down to -60: full 120 s later
        assert 119_000 < await redis_client.pttl(limiter.key("c")) <= 121_000
    finally:
        await limiter.close()


async def test_redis_unreachable_fails_open_with_one_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    limiter = RedisRateLimiter("redis://127.0.0.1:1/0", 1, 1)
    try:
        with caplog.at_level(logging.WARNING, logger="chatserver.limits.rate"):
            for _ in range(3):
                await limiter.admit("c")  # over the limit of 1, yet served
            await limiter.charge_tokens("c", 100)
        warnings = [r for r in caplog.records if "not enforced" in r.getMessage()]
        assert len(warnings) == 1
    finally:
        await limiter.close()


# --- real servers --------------------------------------------------------------------

RATE = 3
TOKEN_RATE = 20
PREFIX = f"chatserver-test-{uuid.uuid4().hex[:8]}:"


@pytest.fixture(scope="module")
def servers(redis_url: str) -> Iterator[tuple[ServerProcess, ServerProcess, ServerProcess]]:
    """One in-memory server, and two sharing one Redis (and one key prefix); started together."""
    common = ("--skip-quality-gate", "--max-batch", "4", "--log-level", "warning")
    memory = ServerProcess("--rate-limit", str(RATE), *common)
    shared = ("--redis-url", redis_url, "--redis-prefix", PREFIX)
    limits = ("--rate-limit", str(RATE), "--token-rate-limit", str(TOKEN_RATE))
    a = ServerProcess(*shared, *limits, *common)
    b = ServerProcess(*shared, *limits, *common)
    try:
        for proc in (memory, a, b):
            proc.wait_ready()
        yield memory, a, b
    finally:
        for proc in (memory, a, b):
            proc.stop()
        delete_redis_keys(redis_url, PREFIX)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        yield session


async def query(
    http: aiohttp.ClientSession, server: ServerProcess, **body: Any
) -> tuple[int, Any, Any]:
    body = {"message": "Say hi.", "max_tokens": 2, **body}
    async with http.post(server.url + "/v1/query", json=body) as r:
        return r.status, await r.json(), r.headers


def retry_after(headers: Any) -> int:
    value = int(headers["Retry-After"])
    assert 0 < value <= 60
    return value


async def test_memory_server_limits_every_entry_point_together(
    servers: tuple[ServerProcess, ...], http: aiohttp.ClientSession
) -> None:
    server = servers[0]
    ws_url = server.url.replace("http", "ws") + "/ws"
    async with openai.AsyncOpenAI(
        base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120
    ) as client:
        # Three served, one through each entry point: they count against one budget.
        status, body, _ = await query(http, server)
        assert status == 200, body
        reply = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2
        )
        assert reply.choices[0].message.content
        async with open_ws(ws_url) as ws:
            await ws.send(
                json.dumps({"type": "chat", "content": "Hi", "params": {"max_tokens": 2}})
            )
            frames = [json.loads(await ws.recv()) for _ in range(2)]
            while frames[-1]["type"] != "done":
                frames.append(json.loads(await ws.recv()))
            assert frames[0]["type"] == "session"

            # The fourth, on any entry point, is refused.
            await ws.send(json.dumps({"type": "chat", "id": "four", "content": "Hi"}))
            error = json.loads(await ws.recv())
            assert (error["type"], error["id"], error["code"]) == ("error", "four", "rate_limited")
            assert isinstance(error["retry_after"], int) and 0 < error["retry_after"] <= 60
            assert "3 requests per minute" in error["message"]
            await ws.send(json.dumps({"type": "cancel"}))  # the socket still answers
            assert json.loads(await ws.recv())["code"] == "nothing_to_cancel"

        status, body, headers = await query(http, server)
        assert status == 429
        assert body["error"]["code"] == "rate_limited"
        assert "3 requests per minute" in body["error"]["message"]
        assert retry_after(headers) <= 20  # one request refills every 20 s

        with pytest.raises(openai.RateLimitError) as info:
            await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2
            )
        assert info.value.status_code == 429
        assert info.value.code == "rate_limited"
        assert info.value.body["type"] == "rate_limit_error"
        retry_after(info.value.response.headers)

    # Refused before any prompt work: an unknown session is not even looked up.
    status, body, _ = await query(http, server, session_id="0" * 32)
    assert (status, body["error"]["code"]) == (429, "rate_limited")


@pytest.fixture
async def fresh_budget(redis_client: aioredis.Redis) -> None:
    """Tests on the shared servers each start with full buckets (all clients are 127.0.0.1)."""
    await delete_prefix(redis_client, PREFIX)


async def test_request_limit_holds_across_servers(
    servers: tuple[ServerProcess, ...],
    http: aiohttp.ClientSession,
    fresh_budget: None,
    redis_client: aioredis.Redis,
) -> None:
    _, a, b = servers
    for server in (a, b, a):
        status, body, _ = await query(http, server)
        assert status == 200, body
    # --redis-prefix holds for sessions too, so this module's keys are all under PREFIX.
    assert await redis_client.exists(f"{PREFIX}session:{body['session_id']}")
    key = f"{PREFIX}ratelimit:addr:127.0.0.1"
    assert 0 < await redis_client.pttl(key) <= 61_000
    for server in (b, a):
        status, body, headers = await query(http, server)
        assert (status, body["error"]["code"]) == (429, "rate_limited")
        assert "requests per minute" in body["error"]["message"]
        retry_after(headers)


async def test_token_limit_holds_across_servers(
    servers: tuple[ServerProcess, ...], http: aiohttp.ClientSession, fresh_budget: None
) -> None:
    _, a, b = servers
    started = time.monotonic()
    status, body, _ = await query(
        http, a, message="Count from 1 to 50.", max_tokens=TOKEN_RATE + 4, temperature=0
    )
    assert status == 200, body
    assert body["usage"]["completion_tokens"] == TOKEN_RATE + 4  # the budget is spent
    status, body, headers = await query(http, b)
    assert (status, body["error"]["code"]) == (429, "rate_limited")
    assert f"{TOKEN_RATE} generated tokens per minute" in body["error"]["message"]
    # 4 tokens owed, one more needed, at one token every 3 s: about 15 s.
    assert 15 - (time.monotonic() - started) - 1 <= retry_after(headers) <= 15


async def test_a_cancelled_reply_is_charged_what_it_generated(
    servers: tuple[ServerProcess, ...], fresh_budget: None, redis_client: aioredis.Redis
) -> None:
    _, a, _ = servers
    chat = {"type": "chat", "content": "Count from 1 to 100.", "params": {"max_tokens": 200}}
    async with open_ws(a.url.replace("http", "ws") + "/ws") as ws:
        await ws.send(json.dumps(chat))
        tokens = 0
        while True:
            frame = json.loads(await ws.recv())
            tokens += frame["type"] == "token"
            if tokens == 3:
                await ws.send(json.dumps({"type": "cancel"}))
            if frame["type"] == "done":
                break
    assert frame["finish_reason"] == "cancelled"
    generated = frame["usage"]["completion_tokens"]
    assert 3 <= generated < 200
    left = float(await redis_client.hget(f"{PREFIX}ratelimit:addr:127.0.0.1", "tok"))
    assert left == pytest.approx(TOKEN_RATE - generated)
