"""chatserver.app: the serving process's shutdown, bounded however clients behave."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator

import aiohttp
import pytest

from tests.serverproc import ServerProcess


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, ServerProcess]]:
    """Each test's server, by --shutdown-timeout, spawned together: each test stops
    its own, and starting both at once saves one start's wait."""
    flags = ("--skip-quality-gate", "--log-level", "warning")
    spawned = {t: ServerProcess("--shutdown-timeout", t, *flags) for t in ("2", "20")}
    yield spawned
    for proc in spawned.values():
        proc.stop()


async def running_at_least(http: aiohttp.ClientSession, url: str, count: int) -> None:
    """Wait until /metrics shows `count` generations scheduled, and one step more."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        async with http.get(url + "/metrics") as r:
            text = await r.text()
        running = [
            float(line.split()[-1])
            for line in text.splitlines()
            if line.startswith("chatserver:num_requests_running")
        ]
        if running and sum(running) >= count:
            await asyncio.sleep(0.3)  # a step: each running generation has a token
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"fewer than {count} generations running after 30 s")


async def test_shutdown_finishes_within_its_timeout(servers):
    proc = servers["2"].wait_ready()
    try:
        async with aiohttp.ClientSession() as http:
            # Sockets whose clients never read, and a reply that would run for long.
            sockets = [
                await http.ws_connect(proc.url + "/ws", autoclose=False, autoping=False)
                for _ in range(12)
            ]
            body = {
                "model": "SmolLM2-135M-Instruct",
                "messages": [
                    {"role": "user", "content": "Count from 1 to 500, one number per line."}
                ],
                "max_tokens": 2000,
                "ignore_eos": True,
                "stream": True,
            }
            query = {
                "message": "Count from 1 to 500, one number per line.",
                "max_tokens": 2000,
                "ignore_eos": True,
            }
            queried = asyncio.create_task(http.post(proc.url + "/v1/query", json=query))
            async with http.post(proc.url + "/v1/chat/completions", json=body) as resp:
                await resp.content.readline()
                # The query too must be running before the signal (under load its
                # request could still be on its way, and get no token at all).
                await running_at_least(http, proc.url, 2)
                started = time.monotonic()
                proc.proc.send_signal(signal.SIGTERM)
                tail = await resp.content.read()
                answer = await (await queried).json()
                loop = asyncio.get_running_loop()
                code = await loop.run_in_executor(None, proc.proc.wait, 30)
                elapsed = time.monotonic() - started
            for ws in sockets:
                await ws.close()
        # The running reply got its share of the 2 s (not a fixed 5 s) and was ended
        # properly; then the server stopped.
        assert elapsed < 2 + 1.5, elapsed
        assert tail.endswith(b"data: [DONE]\n\n"), tail[-200:]
        # Cut short, and saying so: the native API's finish reason, OpenAI's error event.
        assert b'"code": "interrupted"' in tail, tail[-300:]
        assert answer["finish_reason"] == "interrupted" and answer["reply"], answer
        assert code == 0, proc.log()
    finally:
        proc.stop()


async def test_a_second_signal_exits_at_once(servers):
    proc = servers["20"].wait_ready()
    try:
        async with aiohttp.ClientSession() as http:
            body = {
                "model": "SmolLM2-135M-Instruct",
                "messages": [
                    {"role": "user", "content": "Count from 1 to 500, one number per line."}
                ],
                "max_tokens": 2000,
                "ignore_eos": True,
                "stream": True,
            }
            async with http.post(proc.url + "/v1/chat/completions", json=body) as resp:
                await resp.content.readline()  # the reply is running: shutdown would wait
                proc.proc.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.5)
                assert proc.proc.poll() is None  # still draining (up to 5 s of grace)
                started = time.monotonic()
                proc.proc.send_signal(signal.SIGTERM)
                await asyncio.get_running_loop().run_in_executor(None, proc.proc.wait, 30)
                elapsed = time.monotonic() - started
        assert elapsed < 1.5, elapsed
    finally:
        proc.stop()
