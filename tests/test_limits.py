"""chatserver.limits: the frame throttle alone, then every WebSocket limit on a real server."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
import websockets
from websockets.exceptions import ConnectionClosed

from chatserver.limits import FrameThrottle
from tests.serverproc import ServerProcess


async def elapsed(throttle: FrameThrottle, frames: int) -> float:
    start = time.monotonic()
    for _ in range(frames):
        await throttle.wait()
    return time.monotonic() - start


async def test_burst_within_rate_is_not_delayed() -> None:
    assert await elapsed(FrameThrottle(20), 20) < 0.2


async def test_frames_beyond_rate_wait_for_the_window() -> None:
    assert 0.9 < await elapsed(FrameThrottle(5), 6) < 1.5


async def test_rate_below_one_spaces_frames_out() -> None:
    assert 1.2 < await elapsed(FrameThrottle(0.8), 2) < 1.7  # one frame per 1.25 s


async def test_zero_rate_disables() -> None:
    assert await elapsed(FrameThrottle(0), 1000) < 0.2


# --- on a server with tight limits --------------------------------------------------

RATE = 5
QUEUE = 2
FRAME = 1024


@pytest.fixture(scope="module")
def tight() -> Iterator[ServerProcess]:
    proc = ServerProcess(
        "--ws-rate", str(RATE),
        "--ws-queue", str(QUEUE),
        "--ws-heartbeat", "0.5",
        "--max-frame-bytes", str(FRAME),
        "--max-body-bytes", "2048",
        "--skip-quality-gate",
        "--log-level", "warning",
    ).wait_ready()  # fmt: skip
    yield proc
    proc.stop()


def ws_url(server: ServerProcess) -> str:
    return server.url.replace("http://", "ws://") + "/ws"


async def recv(ws: Any) -> dict[str, Any]:
    return json.loads(await asyncio.wait_for(ws.recv(), 60))


async def test_throttle_paces_a_flooding_client(tight: ServerProcess) -> None:
    async with websockets.connect(ws_url(tight)) as ws:
        start = time.monotonic()
        for _ in range(3 * RATE):
            await ws.send(json.dumps({"type": "cancel"}))
        for _ in range(3 * RATE):
            assert (await recv(ws))["code"] == "nothing_to_cancel"  # every frame is answered
        assert time.monotonic() - start > 1.5  # ...but at most RATE a second


async def test_queue_bound(tight: ServerProcess) -> None:
    async with websockets.connect(ws_url(tight)) as ws:
        for i in range(QUEUE + 2):
            await ws.send(
                json.dumps(
                    {
                        "type": "chat",
                        "id": f"m{i}",
                        "content": "Count to 50.",
                        "params": {"max_tokens": 32},
                    }
                )
            )
        frames = []
        while not frames or frames[-1]["type"] != "error":
            frames.append(await recv(ws))
        assert (frames[-1]["id"], frames[-1]["code"]) == (f"m{QUEUE + 1}", "queue_full")


async def test_frame_limits_follow_settings(tight: ServerProcess) -> None:
    async with websockets.connect(ws_url(tight)) as ws:
        await ws.send(json.dumps({"type": "chat", "content": "x" * (2 * FRAME)}))
        assert (await recv(ws))["code"] == "frame_too_large"
        await ws.send("x" * (10 * FRAME))
        with pytest.raises(ConnectionClosed) as info:
            await recv(ws)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1009


async def test_body_limit_follows_settings(tight: ServerProcess) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(tight.url + "/v1/query", data="x" * 4096) as r:
            assert r.status == 413 and (await r.json())["error"]["code"] == "body_too_large"


async def test_heartbeat_pings_and_drops_silent_clients(tight: ServerProcess) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(tight.url + "/ws", autoping=False) as ws:
            msg = await ws.receive(timeout=5)
            assert msg.type == aiohttp.WSMsgType.PING
            # No pong: the server gives up on this client.
            while msg.type not in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
                msg = await ws.receive(timeout=5)
        # A client that answers pings stays connected across many heartbeats.
        async with websockets.connect(ws_url(tight)) as live:
            await asyncio.sleep(2)
            await live.send(
                json.dumps({"type": "chat", "content": "Hi", "params": {"max_tokens": 4}})
            )
            while (await recv(live))["type"] != "done":
                pass
