"""chatserver.api.health and the server's lifecycle: loading, ready, draining on shutdown."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp

from tests.serverproc import ServerProcess


async def test_healthz_and_readyz(server: ServerProcess) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(server.url + "/healthz") as r:
            assert r.status == 200 and (await r.json())["status"] == "ok"
        async with http.get(server.url + "/readyz") as r:
            assert r.status == 200
            body = await r.json()
            assert body["status"] == "ready" and body["model"] == "SmolLM2-135M-Instruct"
            assert isinstance(body["generations"], int)


async def wait_until_ready(http: aiohttp.ClientSession, proc: ServerProcess) -> list[int]:
    """Poll /healthz and /readyz from the first moment; return the /readyz statuses seen."""
    statuses: list[int] = []
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert proc.proc.poll() is None, proc.log()
        try:
            async with http.get(proc.url + "/healthz") as health:
                assert health.status == 200
            async with http.get(proc.url + "/readyz") as ready:
                statuses.append(ready.status)
                body = await ready.json()
        except aiohttp.ClientConnectorError:
            await asyncio.sleep(0.1)  # not listening yet
            continue
        if ready.status == 200:
            return statuses
        assert body["status"] == "loading" and body["reason"]
        # Not ready: chat is refused with a clear 503, not a hang.
        async with http.post(proc.url + "/v1/query", json={"message": "hi"}) as r:
            if r.status != 200:
                assert r.status == 503 and (await r.json())["error"]["code"] == "not_ready"
        await asyncio.sleep(0.1)
    raise TimeoutError(proc.log())


async def test_readiness_and_graceful_shutdown() -> None:
    proc = ServerProcess("--shutdown-timeout", "2", "--skip-quality-gate", "--log-level", "warning")
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
            statuses = await wait_until_ready(http, proc)
            assert statuses[0] == 503 and statuses[-1] == 200

            # A reply still streaming when the server is told to stop is ended
            # properly after the grace period, and not passed off as complete: an
            # error event `interrupted`, then [DONE]. The process exits well before
            # the test harness would kill it.
            body = {
                "model": "SmolLM2-135M-Instruct",
                "messages": [
                    {"role": "user", "content": "Count from 1 to 500, one number per line."}
                ],
                "max_tokens": 4000,
                "ignore_eos": True,
                "stream": True,
            }
            async with http.post(proc.url + "/v1/chat/completions", json=body) as r:
                await r.content.readuntil(b"\n\n")
                start = time.monotonic()
                stopping = asyncio.create_task(asyncio.to_thread(proc.stop))
                events = (await r.read()).decode().strip().split("\n\n")
            assert events[-1] == "data: [DONE]"
            last = json.loads(events[-2].removeprefix("data: "))
            assert last.get("error", {}).get("code") == "interrupted", events[-4:]
            assert await stopping == 0
            assert time.monotonic() - start < 18
    finally:
        proc.stop()
