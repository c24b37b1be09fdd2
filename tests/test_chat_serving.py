"""chatserver.api.chat.serving: a session's turns, one at a time, on real servers.

Two clients on one session (two sockets, or two servers sharing a Redis) take
turns: the second message waits for the first turn and its prompt holds it. A
message cancelled before its reply started stores nothing. The history cap
(--max-history-messages) holds through the server.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest
from transformers import AutoTokenizer

from chatserver.api.chat.serving import ToolAnswers, pending_calls
from chatserver.config import Settings
from chatserver.models.prompt import render
from chatserver.models.tools import ToolChoice
from tests.serverproc import ServerProcess, open_ws, server_pair
from tests.test_api_ws import recv, send, ws_url

SYSTEM = {"role": "system", "content": Settings().system_prompt}
# Greedy replies to it run past 160 tokens: a turn that outlasts the test's steps.
STORY = "Write a short story about a lighthouse keeper who finds a message in a bottle."


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def redis_prefix() -> str:
    return f"chatserver-test-{uuid.uuid4().hex[:8]}:"


@pytest.fixture(scope="module")
def redis_pair(redis_url: str, redis_prefix: str) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    """Two servers sharing one Redis (a prefix of their own), history capped at 6 messages."""
    flags = ("--log-level", "warning", "--max-history-messages", "6")
    flags += ("--skip-quality-gate",)  # the gate: test_quality_gate
    with server_pair(redis_url, redis_prefix, *flags) as servers:
        yield servers


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        yield session


async def query(http: aiohttp.ClientSession, server: ServerProcess, **body: Any) -> dict[str, Any]:
    async with http.post(f"{server.url}/v1/query", json=body) as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def history(http: aiohttp.ClientSession, server: ServerProcess, sid: str) -> list[dict]:
    async with http.get(f"{server.url}/v1/sessions/{sid}") as r:
        assert r.status == 200
        return (await r.json())["messages"]


async def timed_answer(ws: Any, message_id: str) -> tuple[str, dict, float | None, float]:
    """Read up to `message_id`'s done: (text, done frame, first token time, done time)."""
    text, first = "", None
    while True:
        frame = await recv(ws)
        if frame.get("id") != message_id:
            continue
        if frame["type"] == "token":
            first = first or time.monotonic()
            text += frame["content"]
        elif frame["type"] in ("done", "error"):
            assert frame["type"] == "done", frame
            return text, frame, first, time.monotonic()


async def two_clients_at_once(
    tokenizer: Any, http: aiohttp.ClientSession, one: ServerProcess, other: ServerProcess
) -> None:
    """Both send into one session at the same moment; the turns must come one after the other."""
    start = await query(http, one, message="Hi, I am Ann.", max_tokens=8)
    sid = start["session_id"]
    asks = {"A": "Name three colours.", "B": "Name three animals."}
    async with (
        open_ws(ws_url(one, f"?session_id={sid}")) as ws_a,
        open_ws(ws_url(other, f"?session_id={sid}")) as ws_b,
    ):
        for ws in (ws_a, ws_b):
            assert (await recv(ws))["type"] == "session"

        async def ask(ws: Any, name: str) -> tuple[str, dict, float | None, float]:
            await send(ws, type="chat", id=name, content=asks[name], params={"max_tokens": 24})
            return await timed_answer(ws, name)

        answers = dict(zip(asks, await asyncio.gather(ask(ws_a, "A"), ask(ws_b, "B")), strict=True))
    first, second = sorted(asks, key=lambda name: answers[name][3])
    # The second reply started only once the first was over...
    assert answers[second][2] is not None and answers[second][2] > answers[first][3]
    # ...both are stored, in the order they ran...
    opening = [{"role": "user", "content": "Hi, I am Ann."}]
    opening.append({"role": "assistant", "content": start["reply"]})
    turns = [
        {"role": "user", "content": asks[first]},
        {"role": "assistant", "content": answers[first][0]},
        {"role": "user", "content": asks[second]},
        {"role": "assistant", "content": answers[second][0]},
    ]
    assert await history(http, other, sid) == opening + turns
    # ...and each prompt held the turn before it: exactly the history it came after.
    prompt = answers[first][1]["usage"]["prompt_tokens"]
    assert prompt == len(render(tokenizer, [SYSTEM, *opening, turns[0]]))
    prompt = answers[second][1]["usage"]["prompt_tokens"]
    assert prompt == len(render(tokenizer, [SYSTEM, *opening, *turns[:3]]))


async def test_two_sockets_on_one_session_take_turns(
    tokenizer: Any, http: aiohttp.ClientSession, server: ServerProcess
) -> None:
    await two_clients_at_once(tokenizer, http, server, server)


async def test_two_servers_sharing_redis_take_turns_on_one_session(
    tokenizer: Any, http: aiohttp.ClientSession, redis_pair: tuple[ServerProcess, ServerProcess]
) -> None:
    await two_clients_at_once(tokenizer, http, *redis_pair)


async def test_a_message_cancelled_before_it_starts_stores_nothing(
    http: aiohttp.ClientSession, server: ServerProcess
) -> None:
    start = await query(http, server, message="Hi", max_tokens=4)
    sid = start["session_id"]
    async with open_ws(ws_url(server, f"?session_id={sid}")) as ws:
        assert (await recv(ws))["type"] == "session"
        for i in range(3):
            # The cancel lands while the message is being started (its session
            # read, its prompt built): it was answered as cancelled, with no
            # reply, and used to be stored as an empty cancelled turn.
            await send(ws, type="chat", id=f"c{i}", content="Count to 100.")
            await send(ws, type="cancel", id=f"c{i}")
            text, done, _, _ = await timed_answer(ws, f"c{i}")
            assert text == "" and done["finish_reason"] == "cancelled"
            assert done["usage"]["completion_tokens"] == 0
            assert done.get("stored") is not True
    assert len(await history(http, server, sid)) == 2


# A turn that outlasts what the tests do beside it at any speed: with 80 tokens, at
# int4's 107 tok/s on the AVX2 EPYC, the long turn ended 0.14 s after the cancel
# below, inside the 0.2 s the test asks (a fresh clone's make test, 2026-12-06).
LONG_TURN = {"max_tokens": 240, "ignore_eos": True}


async def test_a_message_waiting_for_a_busy_session_can_be_cancelled(
    http: aiohttp.ClientSession, server: ServerProcess
) -> None:
    start = await query(http, server, message="Hi", max_tokens=4)
    sid = start["session_id"]
    async with (
        open_ws(ws_url(server, f"?session_id={sid}")) as busy,
        open_ws(ws_url(server, f"?session_id={sid}")) as waiting,
    ):
        for ws in (busy, waiting):
            assert (await recv(ws))["type"] == "session"
        await send(busy, type="chat", id="long", content=STORY, params=LONG_TURN)
        while (first := await recv(busy))["type"] != "token":
            pass
        long_turn = asyncio.create_task(timed_answer(busy, "long"))
        await send(waiting, type="chat", id="w", content="Say hi.", params={"max_tokens": 8})
        await asyncio.sleep(0.5)
        await send(waiting, type="cancel", id="w")
        text, done, _, cancelled_at = await timed_answer(waiting, "w")
        assert text == "" and done["finish_reason"] == "cancelled"
        assert done["usage"]["completion_tokens"] == 0
        long_text, long_done, _, long_done_at = await long_turn
        assert long_done["finish_reason"] == "length"  # it was still running, to the end
        assert cancelled_at < long_done_at - 0.2  # the other stopped waiting at once
    messages = await history(http, server, sid)
    long_text = first["content"] + long_text
    assert [m["content"] for m in messages] == ["Hi", start["reply"], STORY, long_text]


async def test_history_cap_flag(
    http: aiohttp.ClientSession, redis_pair: tuple[ServerProcess, ServerProcess]
) -> None:
    """--max-history-messages 6: the 4th turn (8 messages) drops the oldest down to 4."""
    a, b = redis_pair
    sid = (await query(http, a, message="m0", max_tokens=2))["session_id"]
    replies = []
    for i in (1, 2, 3):
        server = (a, b)[i % 2]
        replies.append(await query(http, server, message=f"m{i}", session_id=sid, max_tokens=2))
        if i == 2:
            assert [m["content"] for m in await history(http, a, sid)][::2] == ["m0", "m1", "m2"]
    kept = await history(http, b, sid)
    assert [m["content"] for m in kept] == ["m2", replies[1]["reply"], "m3", replies[2]["reply"]]


async def test_a_message_too_long_for_any_prompt_does_not_wait_for_its_session(
    http: aiohttp.ClientSession, server: ServerProcess
) -> None:
    """More characters than the context could hold: refused at once, the session never locked."""
    sid = (await query(http, server, message="Hi", max_tokens=4))["session_id"]
    async with open_ws(ws_url(server, f"?session_id={sid}")) as busy:
        assert (await recv(busy))["type"] == "session"
        await send(busy, type="chat", id="long", content=STORY, params=LONG_TURN)
        while (await recv(busy))["type"] != "token":
            pass
        long_turn = asyncio.create_task(timed_answer(busy, "long"))
        huge = {"message": "a" * 400_000, "session_id": sid}  # 4096 tokens x 81 chars < 400k
        async with http.post(f"{server.url}/v1/query", json=huge) as r:
            refused_at = time.monotonic()
            body = await r.json()
        assert r.status == 400 and body["error"]["code"] == "context_length_exceeded"
        _, long_done, _, long_done_at = await long_turn
    assert long_done["finish_reason"] == "length"
    assert refused_at < long_done_at - 0.2  # not after the turn that held the session


# --- tool calls in the history (/ws tools) ---------------------------------------------


def test_pending_calls_are_the_calls_that_end_a_history() -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    calls = [{"id": "call_1", "name": "f", "arguments": "{}"}]
    asked = {"role": "user", "content": "q"}
    made = {
        "role": "assistant",
        "content": "",
        "tool_calls": calls,
        "tools": [tool],
        "parallel_tool_calls": False,
    }
    pending = pending_calls([asked, made])
    assert pending is not None and pending.call_ids == ("call_1",)
    # A continuation lists the same tools, the model choosing (a forced call again would loop).
    assert [t.name for t in pending.tools.tools] == ["f"]
    assert pending.tools.choice == ToolChoice("auto") and not pending.tools.parallel
    answered = ToolAnswers(("call_1",), ("ok",)).messages()
    assert answered == [{"role": "tool", "tool_call_id": "call_1", "content": "ok"}]
    reply = {"role": "assistant", "content": "Done."}
    assert pending_calls([asked, made, *answered, reply]) is None  # answered
    assert pending_calls([asked, made, asked]) is None  # abandoned: a later message
    assert pending_calls([asked, reply]) is None and pending_calls([]) is None
