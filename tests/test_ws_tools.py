"""Tools over /ws (chatserver.api.ws, protocol/ws.py): real servers, the `websockets` client.

The 135M model is weak, so what is tested is what is guaranteed: ``required`` and
a named ``tool_choice`` make calls whose arguments are valid for their schema
(constrained decoding), the frames around them, the continuation on the calls'
results, the history, and the refusals. Across two servers on one Redis: the
calls are answered from the other instance, delivered live and resumed there.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from typing import Any

import aiohttp
import jsonschema
import pytest
import redis

from tests.serverproc import ServerProcess, open_ws, redis_pair

TIMEOUT = 120.0
PREFIX = f"chatserver-test-wstools-{uuid.uuid4().hex[:8]}:"
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 40},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather in a city.",
            "parameters": WEATHER,
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "The local time in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 40}},
                "required": ["city"],
            },
        },
    },
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
NAMED = {"type": "function", "function": {"name": "get_weather"}}
PARAMS = {"max_tokens": 60}


def ws_url(server: ServerProcess, session_id: str | None = None) -> str:
    query = f"?session_id={session_id}" if session_id else ""
    return server.url.replace("http://", "ws://") + "/ws" + query


async def send(ws: Any, **frame: Any) -> None:
    await ws.send(json.dumps(frame))


async def recv(ws: Any, wait: float = TIMEOUT) -> dict[str, Any]:
    return json.loads(await asyncio.wait_for(ws.recv(), wait))


async def until_end(ws: Any, message_id: str) -> list[dict[str, Any]]:
    """The socket's frames up to the done/error frame of `message_id` (live ones unwrapped)."""
    frames = []
    while True:
        frame = await recv(ws)
        if frame["type"] == "live":
            frame = frame["frame"]
        if frame.get("id") != message_id:
            continue
        frames.append(frame)
        if frame["type"] in ("done", "error"):
            return frames


async def call_turn(ws: Any, message_id: str, **chat: Any) -> tuple[list[dict], dict]:
    """A chat that must call tools: (its calls, its done frame), frames checked."""
    await send(ws, type="chat", id=message_id, params=PARAMS, tools=TOOLS, **chat)
    frames = await until_end(ws, message_id)
    kinds = [f["type"] for f in frames]
    assert kinds[-2:] == ["tool_calls", "done"], frames
    assert set(kinds[:-2]) <= {"token"}
    # Calls are never sent as text.
    assert all("<tool_call>" not in f["content"] for f in frames if f["type"] == "token")
    done = frames[-1]
    assert done["finish_reason"] == "tool_calls" and done["stored"] is True
    calls = frames[-2]["calls"]
    for call in calls:
        assert call["id"].startswith("call_")
        jsonschema.validate(json.loads(call["arguments"]), SCHEMAS[call["name"]])
    return calls, done


async def open_session(ws: Any) -> str:
    """Start the socket's session with a short plain turn; its id."""
    await send(ws, type="chat", id="s0", content="Hi", params={"max_tokens": 2})
    session_id = (await recv(ws))["session_id"]
    assert (await until_end(ws, "s0"))[-1]["type"] == "done"
    return session_id


def results(calls: list[dict], content: str = '{"temperature": 18}') -> list[dict[str, str]]:
    return [{"tool_call_id": c["id"], "content": content} for c in calls]


async def history(server: ServerProcess, session_id: str) -> list[dict[str, Any]]:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{server.url}/v1/sessions/{session_id}") as r:
            assert r.status == 200
            return (await r.json())["messages"]


async def error(ws: Any, **frame: Any) -> dict[str, Any]:
    """Send a frame that must be refused; its error frame (the socket keeps serving)."""
    await send(ws, **frame)
    got = await recv(ws)
    assert got["type"] == "error", got
    return got


# --- one server ------------------------------------------------------------------------


async def test_named_call_then_results_continue_the_reply(server: ServerProcess) -> None:
    async with open_ws(ws_url(server)) as ws:
        await send(
            ws,
            type="chat",
            id="q1",
            content="What is the weather in Paris?",
            params=PARAMS,
            tools=TOOLS,
            tool_choice=NAMED,
        )
        session_id = (await recv(ws))["session_id"]
        frames = await until_end(ws, "q1")
        assert [f["type"] for f in frames] == ["tool_calls", "done"]  # forced: calls only
        calls = frames[0]["calls"]
        assert calls and all(c["name"] == "get_weather" for c in calls)
        for call in calls:
            jsonschema.validate(json.loads(call["arguments"]), WEATHER)
        assert frames[1]["finish_reason"] == "tool_calls"

        await send(ws, type="tool_results", id="q2", results=results(calls))
        frames = await until_end(ws, "q2")
        done = frames[-1]
        assert done["type"] == "done" and done["stored"] is True
        assert done["finish_reason"] in ("stop", "length", "tool_calls")
        text = "".join(f["content"] for f in frames if f["type"] == "token")
    stored = await history(server, session_id)
    assert [m["role"] for m in stored[:3]] == ["user", "assistant", "tool"]
    assert stored[0]["content"] == "What is the weather in Paris?"
    assert stored[1]["tool_calls"] == calls
    assert [t["function"]["name"] for t in stored[1]["tools"]] == ["get_weather", "get_time"]
    tool_messages = stored[2 : 2 + len(calls)]
    assert tool_messages == [
        {"role": "tool", "tool_call_id": c["id"], "content": '{"temperature": 18}'} for c in calls
    ]
    assert stored[-1]["role"] == "assistant" and len(stored) == 3 + len(calls)
    if done["finish_reason"] != "tool_calls":
        assert stored[-1]["content"] == text


async def test_required_without_parallel_makes_one_call(server: ServerProcess) -> None:
    async with open_ws(ws_url(server)) as ws:
        calls, _ = await call_turn(
            ws,
            "r1",
            content="Weather and time in Rome and in Oslo?",
            tool_choice="required",
            parallel_tool_calls=False,
        )
        assert len(calls) == 1 and calls[0]["name"] in SCHEMAS
        # One result at a time: the one that answers the last call starts the continuation.
        await send(ws, type="tool_result", id="r2", tool_call_id=calls[0]["id"], content="ok")
        frames = await until_end(ws, "r2")
        assert frames[-1]["type"] == "done"


async def test_tool_choice_none_lists_no_tools_and_replies_in_text(
    server: ServerProcess,
) -> None:
    async with open_ws(ws_url(server)) as ws:
        await send(
            ws,
            type="chat",
            id="n1",
            content="Hi",
            params={"max_tokens": 8},
            tools=TOOLS,
            tool_choice="none",
        )
        frames = await until_end(ws, "n1")
    assert "tool_calls" not in [f["type"] for f in frames]
    assert frames[-1]["finish_reason"] in ("stop", "length")


@pytest.mark.parametrize(
    ("chat", "starts"),
    [
        ({"tools": {"type": "function"}}, "'tools' must be a list"),
        (
            {"tools": [{"type": "function", "function": {"name": "bad name"}}]},
            "tools[0].function.name: ",
        ),
        ({"tools": [{"type": "retrieval"}]}, "tools[0]: "),
        (
            {
                "tools": [
                    {"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}
                ]
            },
            "tools[0].function.parameters: ",
        ),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "'tool_choice' must be"),
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "'tool_choice' names 'nope'",
        ),
        ({"tool_choice": "required"}, "'tool_choice' needs 'tools'"),
        ({"tools": TOOLS, "parallel_tool_calls": "yes"}, "'parallel_tool_calls' must be"),
    ],
)
async def test_bad_tools_are_error_frames_and_the_socket_serves_on(
    server: ServerProcess, chat: dict[str, Any], starts: str
) -> None:
    async with open_ws(ws_url(server)) as ws:
        got = await error(ws, type="chat", id="b1", content="hi", **chat)
        assert (got["code"], got["id"]) == ("invalid_field", "b1")
        assert got["message"].startswith(starts), got["message"]
        await send(ws, type="chat", id="b2", content="Hi", params={"max_tokens": 2})
        assert (await until_end(ws, "b2"))[-1]["type"] == "done"


async def test_a_schema_the_grammar_cannot_take_is_an_error_frame(
    server: ServerProcess,
) -> None:
    bad = [
        {
            "type": "function",
            "function": {
                "name": "f",
                "parameters": {"type": "object", "properties": {"x": {"$ref": "#/$defs/missing"}}},
            },
        }
    ]
    async with open_ws(ws_url(server)) as ws:
        got = await error(ws, type="chat", id="g1", content="hi", tools=bad, tool_choice="required")
        assert (got["code"], got["id"]) == ("invalid_field", "g1")
        assert got["message"].startswith("tools: ")


async def test_bad_results_are_error_frames(server: ServerProcess) -> None:
    async with open_ws(ws_url(server)) as ws:
        # No calls pending at all (no session yet).
        got = await error(
            ws, type="tool_results", id="x", results=[{"tool_call_id": "call_x", "content": "1"}]
        )
        assert got["code"] == "unknown_tool_call" and "no session" in got["message"]
        for frame, starts in [
            ({"results": []}, "'results' must be a list"),
            ({"results": [{"tool_call_id": "a"}]}, "'results[0].content'"),
            ({"results": [{"content": "1"}]}, "'results[0].tool_call_id'"),
            ({"results": [{"tool_call_id": "a", "content": "1"}] * 2}, "'results' answers"),
        ]:
            got = await error(ws, type="tool_results", id="x", **frame)
            assert got["code"] == "invalid_field" and got["message"].startswith(starts), got

        calls, _ = await call_turn(ws, "c1", content="Weather in Oslo?", tool_choice=NAMED)
        # An id that is not one of the calls, alone or beside the right ones.
        got = await error(
            ws,
            type="tool_results",
            id="c2",
            results=[{"tool_call_id": "call_nope", "content": "1"}],
        )
        assert got["code"] == "unknown_tool_call" and "call_nope" in got["message"]
        mixed = [*results(calls), {"tool_call_id": "call_nope", "content": "1"}]
        got = await error(ws, type="tool_results", id="c2", results=mixed)
        assert got["code"] == "unknown_tool_call"
        # Refusals took none of the results: the real ones still continue the reply.
        await send(ws, type="tool_results", id="c2", results=results(calls))
        assert (await until_end(ws, "c2"))[-1]["type"] == "done"
        # Answered: the calls are no longer pending.
        got = await error(ws, type="tool_results", id="c3", results=results(calls))
        assert got["code"] == "unknown_tool_call"


async def test_a_chat_message_abandons_pending_calls(server: ServerProcess) -> None:
    async with open_ws(ws_url(server)) as ws:
        calls, _ = await call_turn(ws, "a1", content="Weather in Lima?", tool_choice=NAMED)
        await send(ws, type="chat", id="a2", content="Never mind.", params={"max_tokens": 4})
        assert (await until_end(ws, "a2"))[-1]["type"] == "done"
        got = await error(ws, type="tool_results", id="a3", results=results(calls))
        assert got["code"] == "unknown_tool_call" and "abandoned" in got["message"]


# --- two servers on one Redis ----------------------------------------------------------


@pytest.fixture(scope="module")
def pair(redis_url: str) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    with redis_pair(redis_url, PREFIX, 2) as servers:
        yield servers


async def test_calls_made_on_a_are_answered_on_b_and_seen_live(
    pair: tuple[ServerProcess, ServerProcess],
) -> None:
    a, b = pair
    async with open_ws(ws_url(a)) as on_a:
        session_id = await open_session(on_a)
        async with open_ws(ws_url(b, session_id)) as watcher:
            assert (await recv(watcher))["type"] == "session"
            calls, _ = await call_turn(on_a, "h1", content="Weather in Kyiv?", tool_choice=NAMED)
            seen = await until_end(watcher, "h1")
            assert seen[0] == {"type": "user", "id": "h1", "content": "Weather in Kyiv?"}
            assert seen[-2] == {"type": "tool_calls", "id": "h1", "calls": calls}
            assert seen[-1]["finish_reason"] == "tool_calls"
    # The client reconnects to b: the calls are the session's, answered there.
    async with open_ws(ws_url(b, session_id)) as on_b:
        assert (await recv(on_b))["type"] == "session"
        await send(on_b, type="tool_results", id="h2", results=results(calls, "-3 C"))
        assert (await until_end(on_b, "h2"))[-1]["type"] == "done"
        # The continuation replays from the channel as it started: its results.
        await send(on_b, type="resume", id="h2")
        replay = await until_end(on_b, "h2")
        assert replay[-1]["type"] == "done"
    stored = await history(a, session_id)
    assert [m["role"] for m in stored] == [
        "user",
        "assistant",
        "user",
        "assistant",
        *["tool"] * len(calls),
        "assistant",
    ]
    assert stored[3]["tool_calls"] == calls
    assert [m["content"] for m in stored[4 : 4 + len(calls)]] == ["-3 C"] * len(calls)


async def test_resume_on_b_replays_the_tool_calls_frame(
    pair: tuple[ServerProcess, ServerProcess],
) -> None:
    a, b = pair
    async with open_ws(ws_url(a)) as on_a:
        session_id = await open_session(on_a)
        calls, _ = await call_turn(on_a, "t1", content="Weather in Cairo?", tool_choice=NAMED)
    async with open_ws(ws_url(b, session_id)) as on_b:
        assert (await recv(on_b))["type"] == "session"
        await send(on_b, type="resume", id="t1")
        replay = await until_end(on_b, "t1")
    assert [f["type"] for f in replay] == ["tool_calls", "done"]
    assert replay[0]["calls"] == calls and replay[1]["finish_reason"] == "tool_calls"


async def test_missing_results_are_refused_and_a_batch_answers_every_call(
    pair: tuple[ServerProcess, ServerProcess], redis_url: str
) -> None:
    """A reply with two calls (the second planted in the stored message, in Redis: the
    model may or may not make two): a batch with one is missing_tool_results."""
    a, b = pair
    async with open_ws(ws_url(a)) as on_a:
        await send(
            on_a,
            type="chat",
            id="p1",
            content="Weather in Bern?",
            params=PARAMS,
            tools=TOOLS,
            tool_choice=NAMED,
            parallel_tool_calls=False,
        )
        session_id = (await recv(on_a))["session_id"]
        frames = await until_end(on_a, "p1")
        (call,) = frames[-2]["calls"]
    second = {"id": "call_" + "0" * 24, "name": "get_time", "arguments": '{"city": "Bern"}'}
    client = redis.Redis.from_url(redis_url)
    key = f"{PREFIX}session:{session_id}:messages"  # sessions/redis.py's layout
    try:
        last = json.loads(client.lindex(key, -1))
        last["tool_calls"].append(second)
        client.lset(key, -1, json.dumps(last))
    finally:
        client.close()
    async with open_ws(ws_url(b, session_id)) as on_b:
        assert (await recv(on_b))["type"] == "session"
        got = await error(on_b, type="tool_results", id="p2", results=results([call]))
        assert got["code"] == "missing_tool_results" and second["id"] in got["message"]
        await send(on_b, type="tool_results", id="p2", results=results([call, second]))
        assert (await until_end(on_b, "p2"))[-1]["type"] == "done"
    stored = await history(b, session_id)
    assert [m.get("tool_call_id") for m in stored[2:4]] == [call["id"], second["id"]]
