"""Admission control, request timeouts and keep-alives (limits/admission.py, the engine).

The queue's arithmetic is tested on its own with a fake clock; the behaviour
over real sockets against real servers with small bounds.
"""

from __future__ import annotations

import asyncio
import json

import aiohttp
import openai
import pytest

from chatserver.limits.admission import AdmissionQueue, ServerBusy
from tests.serverproc import ServerProcess, wait_no_generations

MODEL = "SmolLM2-135M-Instruct"
# With ignore_eos a reply runs to its max_tokens whatever the model says: one that
# surely outlasts a short deadline, on every CPU and precision.
LONG_PROMPT = "Count from 1 to 500, one number per line."


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_queue_admits_running_slots_plus_queue_then_refuses():
    queue = AdmissionQueue(max_queue=2, clock=FakeClock())
    tickets = [queue.admit(running_slots=3) for _ in range(5)]
    assert queue.admitted == 5 and queue.waiting(3) == 2
    with pytest.raises(ServerBusy):
        queue.admit(running_slots=3)
    tickets[0].release()
    tickets[0].release()  # idempotent
    assert queue.admitted == 4
    queue.admit(running_slots=3)
    # Fewer ready workers, fewer places.
    with pytest.raises(ServerBusy):
        queue.admit(running_slots=1)


def test_admit_many_takes_all_places_or_none():
    """A request's n choices (OpenAI's ``n``) never start partly."""
    queue = AdmissionQueue(max_queue=1, clock=FakeClock())
    first = queue.admit_many(running_slots=3, count=3)
    assert len(first) == 3 and queue.admitted == 3
    with pytest.raises(ServerBusy):
        queue.admit_many(running_slots=3, count=2)  # 3 + 2 > 4 places
    assert queue.admitted == 3
    (last,) = queue.admit_many(running_slots=3, count=1)
    for ticket in (*first, last):
        ticket.release()
    assert queue.admitted == 0
    assert len(queue.admit_many(running_slots=3, count=4)) == 4


def test_retry_after_follows_the_drain_rate():
    clock = FakeClock()
    queue = AdmissionQueue(max_queue=4, clock=clock)
    tickets = [queue.admit(running_slots=2) for _ in range(6)]
    with pytest.raises(ServerBusy) as before:
        queue.admit(running_slots=2)
    assert before.value.retry_after == 1.0  # nothing finished yet: ask again soon
    # Two completions a second: 4 waiting + this one ahead -> 2.5 s.
    for t in tickets[:3]:
        clock.now += 0.5
        t.release(completed=True)
    for _ in range(3):
        queue.admit(running_slots=2)
    with pytest.raises(ServerBusy) as busy:
        queue.admit(running_slots=2)
    assert busy.value.retry_after == pytest.approx(2.5)
    # Twice as slow, twice as long.
    queue2 = AdmissionQueue(max_queue=4, clock=clock)
    slow = [queue2.admit(running_slots=2) for _ in range(6)]
    for t in slow[:3]:
        clock.now += 1.0
        t.release(completed=True)
    for _ in range(3):
        queue2.admit(running_slots=2)
    with pytest.raises(ServerBusy) as slower:
        queue2.admit(running_slots=2)
    assert slower.value.retry_after == pytest.approx(5.0)
    # Refused and cancelled requests are not completions.
    queue3 = AdmissionQueue(max_queue=0, clock=clock)
    for _ in range(3):
        clock.now += 0.1
        queue3.admit(running_slots=1).release(completed=False)
    assert queue3.drain_rate() is None


@pytest.fixture(scope="module")
def small_server():
    proc = ServerProcess(
        "--max-running", "4", "--max-queue", "4", "--skip-quality-gate", "--log-level", "warning"
    ).wait_ready()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def deadline_server():
    proc = ServerProcess(
        "--max-running",
        "1",
        "--max-queue",
        "4",
        "--request-timeout",
        "2",
        "--keepalive-interval",
        "0.2",
        "--skip-quality-gate",
        "--log-level",
        "warning",
    ).wait_ready()
    yield proc
    proc.stop()


async def test_sixty_at_once_are_served_or_told_busy_with_retry_after(small_server):
    url = small_server.url
    async with aiohttp.ClientSession() as http:

        async def one(i: int) -> tuple[int, dict, str | None]:
            body = {"message": f"Say the number {i}.", "max_tokens": 12, "temperature": 0}
            async with http.post(url + "/v1/query", json=body) as resp:
                return resp.status, await resp.json(), resp.headers.get("Retry-After")

        results = await asyncio.gather(*(one(i) for i in range(60)))
        async with http.get(url + "/readyz") as resp:
            admission = (await resp.json())["admission"]
    served = [r for r in results if r[0] == 200]
    busy = [r for r in results if r[0] == 503]
    assert len(served) + len(busy) == 60, {r[0] for r in results}
    assert len(served) >= 8  # 4 running + 4 queued at least
    assert len(busy) >= 30
    for _, body, retry_after in busy:
        assert body["error"]["code"] == "server_busy", body
        assert retry_after is not None and 1 <= int(retry_after) <= 60
    assert all(body["reply"] for _, body, _ in served)
    assert admission == {"admitted": 0, "waiting": 0, "running_slots": 4, "max_queue": 4}


async def hold_slots(url: str, count: int, max_tokens: int = 300) -> list[asyncio.Task]:
    """Streamed long replies that keep `count` places taken until cancelled."""
    http = aiohttp.ClientSession()
    started = asyncio.Event()
    tasks = []

    async def one() -> None:
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": LONG_PROMPT}],
            "max_tokens": max_tokens,
            "ignore_eos": True,
            "stream": True,
        }
        try:
            async with http.post(url + "/v1/chat/completions", json=body) as resp:
                async for _ in resp.content:
                    started.set()
        finally:
            started.set()

    for _ in range(count):
        tasks.append(asyncio.create_task(one()))
    closer = asyncio.create_task(_close_when_done(http, tasks))
    await asyncio.wait_for(started.wait(), 60)
    return [*tasks, closer]


async def _close_when_done(http: aiohttp.ClientSession, tasks: list[asyncio.Task]) -> None:
    try:
        await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        await http.close()


async def release(tasks: list[asyncio.Task]) -> None:
    for task in tasks[:-1]:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def wait_admitted(url: str, count: int) -> None:
    async with aiohttp.ClientSession() as http:
        for _ in range(200):
            async with http.get(url + "/readyz") as resp:
                if (await resp.json())["admission"]["admitted"] >= count:
                    return
            await asyncio.sleep(0.05)
    raise AssertionError(f"fewer than {count} requests admitted")


async def test_busy_is_checked_before_the_prompt_and_on_every_api(small_server):
    url = small_server.url
    holders = await hold_slots(url, 8)
    try:
        await wait_admitted(url, 8)
        async with aiohttp.ClientSession() as http:
            # A prompt that tokenizing would find too long (300,000 characters: under
            # the character bound, which refuses longer ones before anything else)
            # is refused as busy: no tokenizing was spent on it.
            huge = {"message": "word " * 60_000, "max_tokens": 4}
            async with http.post(url + "/v1/query", json=huge) as resp:
                assert resp.status == 503
                assert (await resp.json())["error"]["code"] == "server_busy"
            async with http.ws_connect(url + "/ws") as ws:
                await ws.send_json({"type": "chat", "content": "Hello", "id": "a"})
                frame = await ws.receive_json(timeout=10)
                assert frame["type"] == "error" and frame["code"] == "server_busy", frame
                assert frame["id"] == "a" and frame["retry_after"] >= 1
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.APIStatusError) as caught:
            await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4
            )
        assert caught.value.status_code == 503
        assert caught.value.response.headers["Retry-After"].isdigit()
        assert caught.value.code == "server_busy"
        await client.close()
    finally:
        await release(holders)
    await wait_no_generations(small_server, within=10)


async def test_a_request_past_its_deadline_is_stopped_and_told(deadline_server):
    url = deadline_server.url
    async with aiohttp.ClientSession() as http:
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": LONG_PROMPT}],
            "max_tokens": 1000,
            "ignore_eos": True,
            "stream": True,
        }
        # The running one streams past its 2 s: an error event, then [DONE].
        async with http.post(url + "/v1/chat/completions", json=body) as resp:
            running = asyncio.create_task(resp.content.read())
            # The queued one (one running slot) times out waiting: 504 before any text.
            query = {"message": LONG_PROMPT, "max_tokens": 10, "ignore_eos": True}
            async with http.post(url + "/v1/query", json=query) as queued:
                assert queued.status == 504
                assert (await queued.json())["error"]["code"] == "request_timeout"
            raw = await running
        events = [line[6:] for line in raw.split(b"\n") if line.startswith(b"data: ")]
        assert events[-1] == b"[DONE]"
        assert json.loads(events[-2])["error"]["code"] == "request_timeout", events[-3:]
        assert len(events) > 5  # it streamed text before its deadline
        # Over WebSocket: tokens, then an error frame, and nothing is stored. The one
        # running slot is free first, so the 2 s are spent generating, not queued.
        await wait_no_generations(deadline_server)
        async with http.ws_connect(url + "/ws") as ws:
            await ws.send_json(
                {
                    "type": "chat",
                    "content": LONG_PROMPT,
                    "id": "w",
                    "params": {"max_tokens": 1000, "ignore_eos": True},
                }
            )
            frames = []
            while not frames or frames[-1]["type"] not in ("error", "done"):
                frames.append(await ws.receive_json(timeout=30))
            assert frames[-1]["code"] == "request_timeout", frames[-1]
            assert any(f["type"] == "token" for f in frames), frames
            session_id = next(f["session_id"] for f in frames if f["type"] == "session")
        async with http.get(f"{url}/v1/sessions/{session_id}") as resp:
            assert (await resp.json())["messages"] == []
    await wait_no_generations(deadline_server)


async def test_a_queued_stream_gets_keepalive_comments(deadline_server):
    url = deadline_server.url
    holders = await hold_slots(url, 1, max_tokens=1000)
    try:
        async with aiohttp.ClientSession() as http:
            body = {
                "model": MODEL,
                "messages": [{"role": "user", "content": "Hi"}],
                "max_tokens": 4,
                "stream": True,
            }
            async with http.post(url + "/v1/chat/completions", json=body) as resp:
                raw = await resp.content.read()
        # It waited (for the slot, then timed out): comments kept the connection warm.
        assert raw.count(b": keep-alive\n\n") >= 3, raw[:300]
    finally:
        await release(holders)
