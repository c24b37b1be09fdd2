"""chatserver.sessions.live and its /ws side: replies delivered to every socket on a session,
across two real servers sharing one real Redis, and resumed from an offset after a disconnect."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing
from typing import Any

import aiohttp
import pytest

from chatserver.protocol.ws import FrameError, ResumeFrame, parse_client_frame
from chatserver.sessions.live import (
    BLOCK_MS,
    LiveChannel,
    MemoryLiveChannel,
    RedisLiveChannel,
    ReplyPublisher,
    coalesce,
)
from tests.serverproc import ServerProcess, delete_redis_keys, open_ws, redis_pair

TIMEOUT = 120.0
PREFIX = f"chatserver-test-live-{uuid.uuid4().hex[:8]}:"
GRACE = 2.0  # --ws-resume-grace of the Redis pair


# --- the resume frame ----------------------------------------------------------------


def test_resume_frame_parses() -> None:
    frame = parse_client_frame(
        '{"type": "resume", "id": "m1", "offset": 7, "session_id": "s"}', 1000
    )
    assert frame == ResumeFrame("m1", 7, "s")
    assert parse_client_frame('{"type": "resume", "id": "m1"}', 1000) == ResumeFrame("m1")


@pytest.mark.parametrize(
    "text",
    [
        '{"type": "resume"}',
        '{"type": "resume", "id": "m1", "offset": -1}',
        '{"type": "resume", "id": "m1", "offset": 1.5}',
        '{"type": "resume", "id": "m1", "offset": true}',
        '{"type": "resume", "id": "m1", "session_id": ""}',
    ],
)
def test_bad_resume_frames_are_refused(text: str) -> None:
    with pytest.raises(FrameError) as err:
        parse_client_frame(text, 1000)
    assert err.value.code == "invalid_field"


# --- the channels, without a server --------------------------------------------------


@pytest.fixture(params=["memory", "redis"])
async def channel(request: pytest.FixtureRequest, redis_url: str) -> AsyncIterator[LiveChannel]:
    if request.param == "memory":
        live: LiveChannel = MemoryLiveChannel(ttl=60)
    else:
        live = RedisLiveChannel(redis_url, ttl=60, prefix=PREFIX + "unit:")
    yield live
    await live.close()
    if request.param == "redis":
        delete_redis_keys(redis_url, PREFIX + "unit:")


async def collect(live: LiveChannel, session_id: str, after: str | None, until: str) -> list[Any]:
    """Frames followed from `after` up to the first of type `until`."""
    frames = []
    async with aclosing(live.follow(session_id, after)) as entries:
        async for entry in entries:
            frames.append(entry.frame)
            if entry.frame["type"] == until:
                return frames
    raise AssertionError("follow ended")


async def test_follow_reads_back_then_live_without_gaps_or_repeats(channel: LiveChannel) -> None:
    sid = uuid.uuid4().hex
    await channel.publish(sid, "a", [{"type": "user", "id": "m1", "content": "hi"}])
    start = (await channel.entries(sid))[0].pos
    follower = asyncio.create_task(collect(channel, sid, None, "done"))  # from now
    replay = asyncio.create_task(collect(channel, sid, start, "done"))  # from the user frame
    await asyncio.sleep(0.2)
    tokens = [{"type": "token", "id": "m1", "content": str(i), "offset": i} for i in range(10)]
    for token in tokens:  # one at a time, as a reply streams
        await channel.publish(sid, "a", [token])
    await channel.publish(sid, "a", [{"type": "done", "id": "m1"}])
    live, replayed = await asyncio.wait_for(asyncio.gather(follower, replay), 10)
    assert live == replayed == [*tokens, {"type": "done", "id": "m1"}]
    assert await channel.last_pos(sid) == (await channel.entries(sid))[-1].pos


async def test_find_reply_and_reply_frames_from_an_offset(channel: LiveChannel) -> None:
    sid = uuid.uuid4().hex
    publisher = ReplyPublisher(channel, sid, "a")
    publisher.send({"type": "user", "id": "m1", "content": "hi"})
    for offset, text in ((0, "Hel"), (3, "lo, "), (7, "world")):
        publisher.send({"type": "token", "id": "m1", "content": text, "offset": offset})
    publisher.send({"type": "done", "id": "m1", "finish_reason": "stop"})
    publisher.finish({"type": "done", "id": "m1", "finish_reason": "cancelled"})  # no-op: ended
    for _ in range(100):
        reply = await channel.find_reply(sid, "m1")
        if reply is not None and reply.finished:
            break
        await asyncio.sleep(0.02)
    assert reply is not None and reply.finished and reply.length == len("Hello, world")
    assert await channel.find_reply(sid, "m2") is None
    frames = [f async for f in channel.reply_frames(sid, "m1", reply, 5)]
    assert contiguous(frames[:-1], 5) and "".join(f["content"] for f in frames[:-1]) == ", world"
    assert frames[-1] == {"type": "done", "id": "m1", "finish_reason": "stop"}
    # Each entry is cut where the offset falls, not just skipped whole.
    await channel.publish(sid, "a", [{"type": "user", "id": "m2", "content": "x"}])
    for offset, text in ((0, "ab"), (2, "cd")):
        await channel.publish(
            sid, "a", [{"type": "token", "id": "m2", "content": text, "offset": offset}]
        )
    await channel.publish(sid, "a", [{"type": "done", "id": "m2"}])
    reply = await channel.find_reply(sid, "m2")
    assert reply is not None and (reply.length, reply.finished) == (4, True)
    frames = [f async for f in channel.reply_frames(sid, "m2", reply, 1)]
    assert [(f.get("offset"), f.get("content")) for f in frames] == [
        (1, "b"),
        (2, "cd"),
        (None, None),
    ]


async def test_a_continuation_starts_at_its_tool_results_and_replays_its_calls(
    channel: LiveChannel,
) -> None:
    """A reply that answers tool calls starts with a tool_results frame (not a user
    one); a reply's tool_calls frame is replayed after its text, before its end."""
    sid = uuid.uuid4().hex
    calls = [{"id": "call_1", "name": "get_weather", "arguments": "{}"}]
    results = [{"tool_call_id": "call_1", "content": "18 C"}]
    await channel.publish(
        sid,
        "a",
        [
            {"type": "user", "id": "m1", "content": "weather?"},
            {"type": "token", "id": "m1", "content": "Let me look.", "offset": 0},
            {"type": "tool_calls", "id": "m1", "calls": calls},
            {"type": "done", "id": "m1", "finish_reason": "tool_calls"},
            {"type": "tool_results", "id": "m2", "results": results},
            {"type": "token", "id": "m2", "content": "Sunny.", "offset": 0},
            {"type": "done", "id": "m2", "finish_reason": "stop"},
        ],
    )
    first = await channel.find_reply(sid, "m1")
    assert first is not None and first.finished and first.length == len("Let me look.")
    frames = [f async for f in channel.reply_frames(sid, "m1", first, 0)]
    assert [f["type"] for f in frames] == ["token", "tool_calls", "done"]
    assert frames[1]["calls"] == calls
    # From past the text on: the calls and the end only.
    frames = [f async for f in channel.reply_frames(sid, "m1", first, first.length)]
    assert [f["type"] for f in frames] == ["tool_calls", "done"]
    second = await channel.find_reply(sid, "m2")
    assert second is not None and second.finished and second.length == len("Sunny.")
    frames = [f async for f in channel.reply_frames(sid, "m2", second, 0)]
    assert [(f["type"], f.get("content")) for f in frames] == [("token", "Sunny."), ("done", None)]


def test_coalesce_merges_adjacent_tokens_of_one_reply_only() -> None:
    frames = [
        {"type": "user", "id": "m", "content": "q"},
        {"type": "token", "id": "m", "content": "Hel", "offset": 0},
        {"type": "token", "id": "m", "content": "lo", "offset": 3},
        {"type": "done", "id": "m"},
        {"type": "token", "id": "n", "content": "a", "offset": 0},
        {"type": "token", "id": "o", "content": "b", "offset": 1},
    ]
    merged = coalesce(frames)
    assert merged[1] == {"type": "token", "id": "m", "content": "Hello", "offset": 0}
    assert merged[2:] == frames[3:] and frames[1]["content"] == "Hel"  # inputs untouched


async def test_redis_reader_joins_a_newly_followed_stream_at_once(redis_url: str) -> None:
    """One blocking read serves all followed streams; a new one interrupts it (CLIENT UNBLOCK)."""
    live = RedisLiveChannel(redis_url, ttl=60, prefix=PREFIX + "unblock:")

    async def first(session_id: str) -> Any:
        async with aclosing(live.follow(session_id)) as entries:
            async for entry in entries:
                return entry.frame

    try:
        waiting = asyncio.create_task(first("s1"))
        await asyncio.sleep(0.3)  # the reader now blocks on s1 alone, for up to BLOCK_MS
        joined = asyncio.create_task(first("s2"))
        await asyncio.sleep(0.05)
        sent = time.monotonic()
        await live.publish("s2", "o", [{"type": "token", "id": "m", "content": "x", "offset": 0}])
        assert (await asyncio.wait_for(joined, 5))["content"] == "x"
        assert time.monotonic() - sent < 0.6 * BLOCK_MS / 1000
        waiting.cancel()
    finally:
        await live.close()
        delete_redis_keys(redis_url, PREFIX + "unblock:")


async def test_memory_channel_expires_and_keeps_maxlen() -> None:
    now = [0.0]
    live = MemoryLiveChannel(ttl=10, maxlen=3, clock=lambda: now[0])
    await live.publish("s", "a", [{"type": "token", "id": "m", "n": i} for i in range(5)])
    assert [e.frame["n"] for e in await live.entries("s")] == [2, 3, 4]
    now[0] = 9.0
    assert await live.entries("s")
    now[0] = 10.5
    assert await live.entries("s") == [] and await live.last_pos("s") == "0-0"


# --- two servers on one Redis --------------------------------------------------------


@pytest.fixture(scope="module")
def pair(redis_url: str) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    """Two servers sharing one Redis (and one key prefix), started together."""
    with redis_pair(redis_url, PREFIX, GRACE) as servers:
        yield servers


def ws_url(server: ServerProcess, session_id: str | None = None) -> str:
    query = f"?session_id={session_id}" if session_id else ""
    return server.url.replace("http://", "ws://") + "/ws" + query


async def send(ws: Any, **frame: Any) -> None:
    await ws.send(json.dumps(frame))


async def recv(ws: Any, wait: float = TIMEOUT) -> dict[str, Any]:
    return json.loads(await asyncio.wait_for(ws.recv(), wait))


async def nothing_more(ws: Any, wait: float = 0.5) -> None:
    with pytest.raises(TimeoutError):
        await recv(ws, wait)


async def reply(ws: Any, message_id: str) -> tuple[str, dict[str, Any], list[dict[str, Any]]]:
    """A socket's own reply: (its text, its done/error frame, its token frames)."""
    tokens = []
    while True:
        frame = await recv(ws)
        if frame.get("id") != message_id:
            continue
        if frame["type"] == "token":
            tokens.append(frame)
        elif frame["type"] in ("done", "error"):
            return "".join(t["content"] for t in tokens), frame, tokens


async def live_reply(ws: Any, message_id: str) -> list[dict[str, Any]]:
    """The inner frames of another socket's reply `message_id`, up to its done/error."""
    frames = []
    while True:
        outer = await recv(ws)
        assert outer["type"] == "live", outer
        frame = outer["frame"]
        if frame["id"] == message_id:
            frames.append(frame)
            if frame["type"] in ("done", "error"):
                return frames


def contiguous(tokens: list[dict[str, Any]], start: int = 0) -> bool:
    """Each token frame's offset is where the one before it ended."""
    for token in tokens:
        if token["offset"] != start:
            return False
        start += len(token["content"])
    return True


async def new_session(server: ServerProcess) -> str:
    async with aiohttp.ClientSession() as http:
        body = {"message": "Hi", "max_tokens": 2}
        async with http.post(server.url + "/v1/query", json=body) as r:
            assert r.status == 200
            return (await r.json())["session_id"]


async def history(server: ServerProcess, session_id: str) -> list[dict[str, Any]]:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{server.url}/v1/sessions/{session_id}") as r:
            assert r.status == 200
            return (await r.json())["messages"]


async def test_session_started_on_a_continues_on_b(
    pair: tuple[ServerProcess, ServerProcess],
) -> None:
    a, b = pair
    async with open_ws(ws_url(a)) as ws:
        await send(ws, type="chat", id="q1", content="My name is Ada.", params={"max_tokens": 8})
        session_id = (await recv(ws))["session_id"]
        first, _, _ = await reply(ws, "q1")
    async with open_ws(ws_url(b, session_id)) as ws:
        assert await recv(ws) == {"type": "session", "session_id": session_id}
        await send(ws, type="chat", id="q2", content="What is my name?", params={"max_tokens": 8})
        second, done, _ = await reply(ws, "q2")
    assert done["type"] == "done" and done["stored"] is True
    assert [(m["role"], m["content"]) for m in await history(a, session_id)] == [
        ("user", "My name is Ada."),
        ("assistant", first),
        ("user", "What is my name?"),
        ("assistant", second),
    ]


async def test_running_reply_is_delivered_on_both_instances(
    pair: tuple[ServerProcess, ServerProcess],
) -> None:
    a, b = pair
    session_id = await new_session(a)
    async with (
        open_ws(ws_url(a, session_id)) as on_a,
        open_ws(ws_url(b, session_id)) as on_b,
    ):
        for ws in (on_a, on_b):
            assert await recv(ws) == {"type": "session", "session_id": session_id}
        question = "Name three colours."
        await send(on_a, type="chat", id="x1", content=question, params={"max_tokens": 24})
        (text, done, tokens), seen = await asyncio.gather(reply(on_a, "x1"), live_reply(on_b, "x1"))
        assert seen[0] == {"type": "user", "id": "x1", "content": question}
        # The same text (in chunks of its own: a lagging channel merges them).
        assert text and contiguous(tokens) and contiguous(seen[1:-1])
        assert "".join(f["content"] for f in seen[1:-1]) == text
        assert seen[-1] == done and done["type"] == "done"
        await nothing_more(on_a)  # its own reply is not echoed back to it

        # And the other way round: a reply generated on b reaches the socket on a.
        await send(on_b, type="chat", id="x2", content="And one more?", params={"max_tokens": 6})
        (text_b, done_b, _), seen_a = await asyncio.gather(
            reply(on_b, "x2"), live_reply(on_a, "x2")
        )
        assert "".join(f["content"] for f in seen_a if f["type"] == "token") == text_b
        assert seen_a[-1] == done_b
    assert len(await history(b, session_id)) == 6


async def test_resume_from_an_offset_on_the_other_instance(
    pair: tuple[ServerProcess, ServerProcess],
) -> None:
    a, b = pair
    session_id = await new_session(a)
    prompt = "Count from 1 to 40, separated by commas."
    ws = await open_ws(ws_url(a, session_id))
    await recv(ws)
    await send(ws, type="chat", id="r1", content=prompt, params={"max_tokens": 64})
    have: list[dict[str, Any]] = []
    while len(have) < 3:
        frame = await recv(ws)
        if frame["type"] == "token":
            have.append(frame)
    ws.transport.abort()  # the network goes away mid-reply
    offset = sum(len(t["content"]) for t in have)

    async with open_ws(ws_url(b)) as again:
        await send(again, type="resume", id="r1", offset=offset, session_id=session_id)
        assert await recv(again) == {"type": "session", "session_id": session_id}
        rest, done, tokens = await reply(again, "r1")
    assert tokens and tokens[0]["offset"] == offset and contiguous(tokens, offset)
    # The reply went on after its socket closed (--ws-resume-grace): not cut off.
    assert done["type"] == "done" and done["finish_reason"] in ("stop", "length")
    assert done["stored"] is True and done["usage"]["completion_tokens"] > len(have)
    stored = (await history(b, session_id))[-1]
    assert stored == {"role": "assistant", "content": "".join(t["content"] for t in have) + rest}

    # Finished, it still resumes from the channel, from anywhere in it; a is fine too.
    async with open_ws(ws_url(a, session_id)) as again:
        await recv(again)
        await send(again, type="resume", id="r1", offset=1)
        text, done_again, _ = await reply(again, "r1")
    assert text == stored["content"][1:] and done_again == done


async def test_resume_errors(pair: tuple[ServerProcess, ServerProcess]) -> None:
    a, b = pair
    async with open_ws(ws_url(b)) as ws:
        await send(ws, type="chat", id="e1", content="Say yes.", params={"max_tokens": 4})
        session_id = (await recv(ws))["session_id"]
        text, _, _ = await reply(ws, "e1")
    async with open_ws(ws_url(a)) as ws:
        await send(ws, type="resume", id="e1")  # no session on this socket, none named
        err = await recv(ws)
        assert (err["type"], err["code"], err["id"]) == ("error", "invalid_field", "e1")
        await send(ws, type="resume", id="e1", session_id="nope")
        assert (await recv(ws))["code"] == "session_not_found"
        await send(ws, type="resume", id="never", session_id=session_id)
        err = await recv(ws)
        assert (err["code"], err["id"]) == ("reply_not_found", "never") and "--live-ttl" in (
            err["message"]
        )
        await send(ws, type="resume", id="e1", offset=len(text) + 1, session_id=session_id)
        err = await recv(ws)
        assert err["code"] == "invalid_field" and "past the end" in err["message"]
        # The socket still works: resume at the very end gets just the done frame.
        await send(ws, type="resume", id="e1", offset=len(text), session_id=session_id)
        assert (await recv(ws))["type"] == "session"
        done = await recv(ws)
        assert (done["type"], done["id"]) == ("done", "e1")


async def test_a_reply_nobody_resumes_is_cancelled_after_the_grace(
    pair: tuple[ServerProcess, ServerProcess],
) -> None:
    a, _ = pair
    session_id = await new_session(a)
    ws = await open_ws(ws_url(a, session_id))
    await recv(ws)
    prompt = "Count from 1 to 500, separated by commas."
    # ignore_eos: the reply must outlast the grace whatever the model would say.
    params = {"max_tokens": 400, "ignore_eos": True}
    await send(ws, type="chat", id="g1", content=prompt, params=params)
    while (await recv(ws))["type"] != "token":
        pass
    ws.transport.abort()
    gone = time.monotonic()
    while len(messages := await history(a, session_id)) < 4:
        assert time.monotonic() - gone < 60, "the detached reply never ended"
        await asyncio.sleep(0.1)
    ended = time.monotonic() - gone
    assert messages[-1]["cancelled"] is True and messages[-1]["content"]
    assert ended >= GRACE * 0.9  # it kept going for the grace, then was cancelled


# --- one server, in-process channel --------------------------------------------------


async def test_memory_channel_two_sockets_on_one_server_both_get_the_reply(
    server: ServerProcess,
) -> None:
    session_id = await new_session(server)
    async with (
        open_ws(ws_url(server, session_id)) as first,
        open_ws(ws_url(server, session_id)) as second,
    ):
        for ws in (first, second):
            await recv(ws)
        await send(second, type="chat", id="t1", content="Say hello.", params={"max_tokens": 8})
        (text, done, tokens), seen = await asyncio.gather(
            reply(second, "t1"), live_reply(first, "t1")
        )
        assert seen[0]["type"] == "user" and seen[-1] == done and contiguous(seen[1:-1])
        assert (
            "".join(f["content"] for f in seen[1:-1])
            == text
            == "".join(t["content"] for t in tokens)
        )
        # Resume works on one server too (the reply is retained in the process).
        await send(first, type="resume", id="t1", offset=0)
        again, done_again, _ = await reply(first, "t1")
        assert (again, done_again) == (text, done)
