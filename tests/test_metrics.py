"""chatserver.metrics and api/metrics.py: GET /metrics moving as real requests run."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest
from openai import AsyncOpenAI
from prometheus_client.parser import text_string_to_metric_families

from chatserver.metrics import Metrics
from tests.serverproc import ServerProcess, open_ws, wait_no_generations

TIMEOUT = 120.0
MAX_BODY = 4096
MAX_FRAME = 1024

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    proc = ServerProcess(
        "--skip-quality-gate",
        "--log-level",
        "warning",
        "--max-body-bytes",
        str(MAX_BODY),
        "--max-frame-bytes",
        str(MAX_FRAME),
    ).wait_ready()
    yield proc
    proc.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT)) as session:
        yield session


async def scrape(http: aiohttp.ClientSession, server: ServerProcess) -> Samples:
    async with http.get(server.url + "/metrics") as r:
        assert r.status == 200
        assert r.content_type == "text/plain"
        text = await r.text()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get(("chatserver:" + name, tuple(sorted(labels.items()))), 0.0)


def rose(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


async def scrape_until(
    http: aiohttp.ClientSession, server: ServerProcess, check: Any, within: float = 10.0
) -> Samples:
    """Scrape until check(samples) holds (what the server counts after answering, say)."""
    deadline = time.monotonic() + within
    while True:
        samples = await scrape(http, server)
        if check(samples):
            return samples
        assert time.monotonic() < deadline, f"not counted within {within} s"
        await asyncio.sleep(0.05)


def ws_url(server: ServerProcess) -> str:
    return server.url.replace("http://", "ws://") + "/ws"


async def recv(ws: Any) -> dict[str, Any]:
    return json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))


async def recv_until(ws: Any, *types: str) -> dict[str, Any]:
    while (frame := await recv(ws))["type"] not in types:
        pass
    return frame


def test_every_documented_series_exists_in_a_fresh_registry() -> None:
    names = {family.name for family in text_string_to_metric_families(Metrics().render().decode())}
    assert names >= {
        "chatserver:" + n
        for n in (
            "num_requests_running",
            "num_requests_waiting",
            "time_to_first_token_seconds",
            "inter_token_latency_seconds",
            "e2e_request_latency_seconds",
            "request_queue_time_seconds",
            "prompt_tokens",
            "generation_tokens",
            "request_success",
            "requests_rejected",
            "requests_dropped",
            "worker_restarts",
            "worker_step_seconds",
            "batch_size",
            "kv_cache_usage_ratio",
            "event_loop_lag_seconds",
            "websocket_connections",
            "http_requests",
        )
    }
    # Two apps in one process: separate registries, no "duplicated timeseries" error.
    Metrics()


async def test_metrics_follow_requests_over_http_ws_and_openai(
    http: aiohttp.ClientSession, server: ServerProcess
) -> None:
    before = await scrape(http, server)
    usages: list[tuple[str, int, int]] = []  # (finish_reason, prompt, completion)

    async with http.post(
        server.url + "/v1/query", json={"message": "Say hello.", "max_tokens": 4}
    ) as r:
        assert r.status == 200
        body = await r.json()
    usages.append((body["finish_reason"], *body["usage"].values()))

    async with open_ws(ws_url(server)) as ws:
        await ws.send(
            json.dumps(
                {
                    "type": "chat",
                    "id": "a",
                    "content": "Count to fifty.",
                    "params": {"max_tokens": 32},
                }
            )
        )
        await recv_until(ws, "token")
        during = await scrape(http, server)
        assert value(during, "websocket_connections") == 1
        assert value(during, "num_requests_running") == 1
        assert value(during, "num_requests_waiting") == 0
        assert 0 < value(during, "kv_cache_usage_ratio") <= 1
        done = await recv_until(ws, "done")
        usages.append((done["finish_reason"], *done["usage"].values()))

    async with AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0) as client:
        stream = await client.chat.completions.create(
            model="SmolLM2-135M-Instruct",
            messages=[{"role": "user", "content": "Name a colour."}],
            max_tokens=5,
            stream=True,
            stream_options={"include_usage": True},
        )
        finish = None
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
            if chunk.usage:
                usage = chunk.usage
    usages.append((finish, usage.prompt_tokens, usage.completion_tokens))

    # /ws is counted when its handler returns, just after the client saw the close.
    after = await scrape_until(
        http,
        server,
        lambda s: rose(before, s, "http_requests_total", route="/ws", status="101") == 1,
    )
    served = len(usages)
    assert rose(before, after, "time_to_first_token_seconds_count") == served
    assert rose(before, after, "e2e_request_latency_seconds_count") == served
    assert rose(before, after, "request_queue_time_seconds_count") == served
    assert rose(before, after, "prompt_tokens_total") == sum(u[1] for u in usages)
    assert rose(before, after, "generation_tokens_total") == sum(u[2] for u in usages)
    # Every token after a stream's first is one delivery or part of one.
    assert (
        0
        < rose(before, after, "inter_token_latency_seconds_count")
        <= sum(u[2] - 1 for u in usages)
    )
    for reason in ("stop", "length"):
        assert rose(before, after, "request_success_total", finished_reason=reason) == sum(
            1 for u in usages if u[0] == reason
        )
    assert rose(before, after, "batch_size_count") > 0
    assert rose(before, after, "worker_step_seconds_count") > 0
    assert value(after, "event_loop_lag_seconds_count") > 0
    assert value(after, "websocket_connections") == 0
    assert value(after, "num_requests_running") == 0
    assert value(after, "kv_cache_usage_ratio") == 0
    assert rose(before, after, "http_requests_total", route="/v1/query", status="200") == 1
    assert (
        rose(before, after, "http_requests_total", route="/v1/chat/completions", status="200") == 1
    )
    # Labels are route templates, never raw paths.
    async with http.get(server.url + "/v1/sessions/" + body["session_id"]) as r:
        assert r.status == 200
    async with http.get(server.url + "/no/such/path") as r:
        assert r.status == 404
    last = await scrape(http, server)
    route = "/v1/sessions/{session_id}"
    assert rose(after, last, "http_requests_total", route=route, status="200") == 1
    assert rose(after, last, "http_requests_total", route="unmatched", status="404") == 1
    assert not any(body["session_id"] in str(key) for key in last)


async def test_refusals_count_as_rejected_too_large(
    http: aiohttp.ClientSession, server: ServerProcess
) -> None:
    before = await scrape(http, server)
    async with http.post(server.url + "/v1/query", json={"message": "x" * MAX_BODY}) as r:
        assert r.status == 413
    async with http.post(server.url + "/v1/query", data="hi") as r:
        assert r.status == 415  # a refusal, but not one requests_rejected_total counts
    async with open_ws(ws_url(server)) as ws:
        await ws.send(json.dumps({"type": "chat", "content": "x" * MAX_FRAME}))
        frame = await recv(ws)
        assert frame["code"] == "frame_too_large"
    after = await scrape(http, server)
    assert rose(before, after, "requests_rejected_total", reason="too_large") == 2
    for reason in ("busy", "rate_limited", "unauthorized"):
        assert rose(before, after, "requests_rejected_total", reason=reason) == 0
    assert rose(before, after, "http_requests_total", route="/v1/query", status="413") == 1
    assert rose(before, after, "http_requests_total", route="/v1/query", status="415") == 1


async def test_clients_that_leave_count_as_dropped_but_cancels_do_not(
    http: aiohttp.ClientSession, server: ServerProcess
) -> None:
    story = [{"role": "user", "content": "Tell me a long story about a dragon."}]
    before = await scrape(http, server)

    # An explicit cancel frame: cancelled, not dropped.
    async with open_ws(ws_url(server)) as ws:
        await ws.send(json.dumps({"type": "chat", "id": "c", "content": "Tell me a long story."}))
        await recv_until(ws, "token")
        await ws.send(json.dumps({"type": "cancel", "id": "c"}))
        assert (await recv_until(ws, "done"))["finish_reason"] == "cancelled"
    mid = await scrape(http, server)
    assert rose(before, mid, "request_success_total", finished_reason="cancelled") == 1
    assert rose(before, mid, "requests_dropped_total") == 0

    # A streamed completion whose client disconnects after the first chunk.
    body = {"model": "SmolLM2-135M-Instruct", "messages": story, "max_tokens": 300, "stream": True}
    async with aiohttp.ClientSession() as leaving:
        async with leaving.post(server.url + "/v1/chat/completions", json=body) as r:
            assert r.status == 200
            await r.content.readline()
    await wait_no_generations(server)
    # A /v1/query whose client gives up while the reply is generated.
    leaving_query = asyncio.create_task(
        http.post(server.url + "/v1/query", json={"message": "Tell me a long story."})
    )
    await scrape_until(http, server, lambda s: value(s, "num_requests_running") == 1)
    leaving_query.cancel()
    await wait_no_generations(server)
    # A WebSocket closed while its reply streams.
    async with open_ws(ws_url(server)) as ws:
        await ws.send(json.dumps({"type": "chat", "content": "Tell me a long story."}))
        await recv_until(ws, "token")
    await wait_no_generations(server)

    after = await scrape_until(http, server, lambda s: rose(mid, s, "requests_dropped_total") >= 3)
    assert rose(mid, after, "requests_dropped_total") == 3
    assert rose(mid, after, "request_success_total", finished_reason="cancelled") == 3
    assert value(after, "num_requests_running") == 0
    assert value(after, "num_requests_waiting") == 0
