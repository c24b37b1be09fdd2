"""chatserver.api.responses: /v1/responses over HTTP and WebSocket mode, with the `openai` client.

On the batch-invariant server (conftest ``exact_server``: greedy texts are compared), and
the stored-response backends against the real Redis.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest
from openai import AsyncOpenAI

from chatserver.api.responses.protocol import parse_create, to_messages
from chatserver.errors import ApiError
from chatserver.sessions.redis import RedisSessionStore
from chatserver.sessions.responses import (
    MemoryResponseStore,
    StoredResponse,
    open_response_store,
)
from tests.serverproc import ServerProcess, delete_redis_keys, generations, wait_no_generations

MODEL = "SmolLM2-135M-Instruct"
INSTRUCTIONS = "You are a helpful assistant."
EVENTS = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
]
DONE_EVENTS = [
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
]
TERMINAL = {"response.completed", "response.incomplete", "response.failed"}


@pytest.fixture
async def client(exact_server: ServerProcess) -> AsyncIterator[AsyncOpenAI]:
    async with AsyncOpenAI(
        base_url=exact_server.url + "/v1", api_key="x", max_retries=0, timeout=120
    ) as c:
        yield c


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        yield session


def greedy(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "temperature": 0, "instructions": INSTRUCTIONS, **extra}


# --- the request schema, without a server ----------------------------------------


def test_parse_create() -> None:
    req = parse_create(
        {
            "model": "m",
            "input": [
                {"role": "developer", "content": "Be brief."},
                {
                    "type": "message",
                    "role": "user",
                    "content": [{"type": "input_text", "text": "a"}],
                },
                {
                    "type": "message",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": "b", "annotations": []}],
                },
                {"type": "function_call", "call_id": "c1", "name": "f", "arguments": '{"x": 1}'},
                {"type": "function_call_output", "call_id": "c1", "output": "2"},
            ],
            "max_output_tokens": 7,
            "text": {"format": {"type": "json_schema", "name": "n", "schema": {"type": "object"}}},
            "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}],
            "include": [],
        }
    )
    assert req.store and not req.stream and req.params.max_tokens == 7
    assert req.params.grammar is not None and req.params.grammar.kind == "json_schema"
    # The same grammar as chat's response_format: not strict, so lenient.
    source = json.loads(req.params.grammar.source)
    assert source == {"type": "object", "x-guidance": {"lenient": True}}
    assert [t.name for t in req.tools] == ["f"] and req.tool_choice.mode == "auto"
    messages = to_messages(req.items)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool"]
    assert messages[2] == {
        "role": "assistant",
        "content": "b",
        "tool_calls": [{"id": "c1", "name": "f", "arguments": '{"x": 1}'}],
    }
    assert messages[3] == {"role": "tool", "content": "2", "tool_call_id": "c1"}
    forced = parse_create(
        {
            "model": "m",
            "input": "x",
            "tools": [{"type": "function", "name": "f"}],
            "tool_choice": {"type": "function", "name": "f"},
        }
    )
    assert forced.tool_choice.forced and forced.params.grammar.kind == "lark"
    assert parse_create({"model": "m", "input": "hi"}).items == [
        {"type": "message", "role": "user", "content": "hi"}
    ]
    for bad, param in [
        ({"input": "hi"}, "model"),
        ({"model": "m"}, "input"),
        ({"model": "m", "input": []}, "input"),
        ({"model": "m", "input": [{"role": "robot", "content": "x"}]}, "input[0].role"),
        ({"model": "m", "input": [{"role": "user", "content": 3}]}, "input[0].content"),
        (
            {"model": "m", "input": [{"role": "user", "content": [{"type": "input_image"}]}]},
            "input[0].content[0]",
        ),
        ({"model": "m", "input": [{"type": "reasoning"}]}, "input[0].type"),
        ({"model": "m", "input": "x", "tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"model": "m", "input": "x", "tools": [{"type": "function"}]}, "tools[0].name"),
        ({"model": "m", "input": "x", "tool_choice": "required"}, "tool_choice"),
        ({"model": "m", "input": "x", "temperature": 3}, "temperature"),
        ({"model": "m", "input": "x", "max_output_tokens": 0}, "max_output_tokens"),
        ({"model": "m", "input": "x", "store": "yes"}, "store"),
        ({"model": "m", "input": "x", "metadata": {"k": 1}}, "metadata"),
        ({"model": "m", "input": "x", "text": {"format": {"type": "xml"}}}, "text.format"),
        ({"model": "m", "input": "x", "truncation": "middle"}, "truncation"),
        ({"model": "m", "input": "x", "background": True, "store": False}, "store"),
        ({"model": "m", "input": "x", "conversation": "c"}, "conversation"),
    ]:
        with pytest.raises(ApiError) as info:
            parse_create(bad)
        assert (info.value.status, info.value.param) == (400, param), bad
    with pytest.raises(ApiError) as info:
        parse_create({"model": "m", "input": "x", "background": True}, websocket=True)
    assert info.value.param == "background"


# --- stored responses: memory and Redis --------------------------------------------


async def test_memory_store_owner_ttl_and_cap() -> None:
    now = [0.0]
    store = MemoryResponseStore(ttl=10, clock=lambda: now[0], max_records=2)
    await store.put(StoredResponse("resp_a", "alice", {"id": "resp_a"}, [{"role": "user"}]))
    assert (await store.get("resp_a", owner="alice")).history == [{"role": "user"}]
    assert await store.get("resp_a", owner="bob") is None
    assert not await store.delete("resp_a", owner="bob")
    now[0] = 8
    assert await store.get("resp_a", owner="alice") is not None  # refreshed at 8
    now[0] = 17
    assert await store.get("resp_a", owner="alice") is not None
    now[0] = 28
    assert await store.get("resp_a", owner="alice") is None  # expired
    for name in ("resp_b", "resp_c", "resp_d"):
        await store.put(StoredResponse(name, "alice", {"id": name}))
    assert len(store) == 2 and await store.get("resp_b", owner="alice") is None


async def test_redis_store_is_shared_between_instances(redis_url: str) -> None:
    prefix = f"test-responses-{uuid.uuid4().hex[:8]}:"
    one = RedisSessionStore(redis_url, ttl=60, prefix=prefix)
    two = RedisSessionStore(redis_url, ttl=60, prefix=prefix)
    try:
        mine, theirs = open_response_store(one), open_response_store(two)
        item = {"id": "msg_1", "type": "message", "role": "user", "content": [], "status": "x"}
        record = StoredResponse(
            "resp_x", "alice", {"id": "resp_x", "status": "completed"}, [{"role": "user"}], [item]
        )
        await mine.put(record)
        # The other instance lists the same input items (ids and all).
        assert await theirs.get("resp_x", owner="alice") == record
        assert (await theirs.get("resp_x", owner="alice")).input_items == [item]
        assert await theirs.get("resp_x", owner="bob") is None
        assert await theirs.get("../session:x", owner="alice") is None
        assert not await theirs.delete("resp_x", owner="bob")
        assert await theirs.delete("resp_x", owner="alice")
        assert await mine.get("resp_x", owner="alice") is None
    finally:
        await one.close()
        await two.close()
        delete_redis_keys(redis_url, prefix)


# --- HTTP ----------------------------------------------------------------------------


async def test_create_returns_openai_response(client: AsyncOpenAI) -> None:
    r = await client.responses.create(
        **greedy(input="Say hello.", max_output_tokens=8, metadata={"k": "v"})
    )
    assert r.id.startswith("resp_") and r.object == "response" and r.model == MODEL
    assert r.status in ("completed", "incomplete") and r.error is None
    assert r.instructions == INSTRUCTIONS and r.metadata == {"k": "v"} and r.store is True
    [item] = r.output
    assert item.type == "message" and item.role == "assistant" and item.id.startswith("msg_")
    [part] = item.content
    assert part.type == "output_text" and part.text and r.output_text == part.text
    assert r.usage.input_tokens > 5 and 0 < r.usage.output_tokens <= 8
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert r.usage.input_tokens_details.cached_tokens >= 0
    if r.status == "incomplete":
        assert r.incomplete_details.reason == "max_output_tokens"
    got = await client.responses.retrieve(r.id)
    assert got.model_dump() == r.model_dump()


async def test_stream_events_in_order(client: AsyncOpenAI) -> None:
    body = greedy(input="Name three colours.", max_output_tokens=12)
    whole = await client.responses.create(**body)
    events = [e async for e in await client.responses.create(**body, stream=True)]
    kinds = [e.type for e in events]
    assert kinds[:4] == EVENTS and kinds[-4:-1] == DONE_EVENTS and kinds[-1] in TERMINAL
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response
    assert text == events[-4].text == final.output_text == whole.output_text
    assert final.id == events[0].response.id and events[0].response.status == "in_progress"
    assert {e.item_id for e in events if hasattr(e, "item_id")} == {final.output[0].id}
    assert (await client.responses.retrieve(final.id)).output_text == text


async def test_previous_response_id_chain(client: AsyncOpenAI) -> None:
    """A chain remembers, and renders exactly the history a client would send itself,
    so the prefix cache reuses each turn's prompt and reply."""
    first = await client.responses.create(
        **greedy(input="The secret word is banana.", max_output_tokens=16)
    )
    second = await client.responses.create(
        **greedy(
            input="What is the secret word?", previous_response_id=first.id, max_output_tokens=16
        )
    )
    assert "banana" in second.output_text.lower()
    assert second.previous_response_id == first.id
    stateless = await client.chat.completions.create(
        model=MODEL,
        temperature=0,
        max_tokens=16,
        messages=[
            {"role": "system", "content": INSTRUCTIONS},
            {"role": "user", "content": "The secret word is banana."},
            {"role": "assistant", "content": first.output_text},
            {"role": "user", "content": "What is the secret word?"},
        ],
    )
    assert stateless.choices[0].message.content == second.output_text
    assert stateless.usage.prompt_tokens == second.usage.input_tokens
    third = await client.responses.create(
        **greedy(input="Say it again.", previous_response_id=second.id, max_output_tokens=8)
    )
    # Turn 3 starts with turn 2's prompt and reply: whole cached blocks of them.
    assert third.usage.input_tokens_details.cached_tokens >= 16
    assert third.usage.input_tokens > second.usage.input_tokens + second.usage.output_tokens


async def test_retrieve_delete_and_unknown_ids(client: AsyncOpenAI) -> None:
    r = await client.responses.create(**greedy(input="Hi.", max_output_tokens=2))
    gone = await client.responses.delete(r.id)
    assert gone is None or getattr(gone, "deleted", True)
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError):
        await client.responses.delete(r.id)
    with pytest.raises(openai.BadRequestError) as info:
        await client.responses.create(**greedy(input="Hi.", previous_response_id=r.id))
    assert info.value.code == "previous_response_not_found"
    assert info.value.param == "previous_response_id"
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve("resp_doesnotexist")


async def test_store_false_is_not_retrievable(client: AsyncOpenAI) -> None:
    r = await client.responses.create(**greedy(input="Hi.", max_output_tokens=2, store=False))
    assert r.store is False
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(r.id)
    with pytest.raises(openai.BadRequestError) as info:
        await client.responses.create(**greedy(input="Hi.", previous_response_id=r.id))
    assert info.value.code == "previous_response_not_found"


async def test_bad_requests_get_openai_errors(
    http: aiohttp.ClientSession, exact_server: ServerProcess
) -> None:
    url = exact_server.url + "/v1/responses"
    for body, status, code, param in [
        ({"model": MODEL}, 400, "invalid_field", "input"),
        ({"model": MODEL, "input": "x", "tools": [{"type": "web_search"}]}, 400,
         "unsupported_parameter", "tools[0].type"),
        ({"model": MODEL, "input": [{"role": "user", "content": [{"type": "input_image"}]}]},
         400, "unsupported_parameter", "input[0].content[0]"),
        ({"model": MODEL, "input": "x", "top_p": -1}, 400, "invalid_parameter", "top_p"),
        ({"model": "gpt-9", "input": "x"}, 404, "model_not_found", "model"),
        ({"model": MODEL, "input": "x", "background": True, "stream": True}, 400,
         "unsupported_parameter", "stream"),
    ]:  # fmt: skip
        async with http.post(url, json=body) as r:
            error = (await r.json())["error"]
            assert (r.status, error["code"], error["param"]) == (status, code, param), body
            assert error["type"] == ("invalid_request_error") and error["message"]
    async with http.post(url, data="{", headers={"Content-Type": "application/json"}) as r:
        assert r.status == 400 and (await r.json())["error"]["code"] == "invalid_json"
    async with http.get(url) as r:  # not an upgrade
        assert r.status == 400 and (await r.json())["error"]["code"] == "invalid_upgrade"
    async with http.post(url + "/resp_nope/cancel") as r:
        assert r.status == 404 and (await r.json())["error"]["type"] == "invalid_request_error"


async def test_background_response_cancelled(
    client: AsyncOpenAI, exact_server: ServerProcess
) -> None:
    r = await client.responses.create(
        **greedy(input="Tell a long story.", max_output_tokens=2000, background=True),
        extra_body={"ignore_eos": True},
    )
    assert r.status == "queued" and r.background is True
    deadline = time.monotonic() + 60
    while (await client.responses.retrieve(r.id)).status == "queued":
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    assert await generations(exact_server) >= 1
    cancelled = await client.responses.cancel(r.id)
    assert cancelled.status == "cancelled"
    await wait_no_generations(exact_server)
    stored = await client.responses.retrieve(r.id)
    assert stored.status == "cancelled" and stored.usage.output_tokens < 2000
    assert (await client.responses.cancel(r.id)).status == "cancelled"  # unchanged


WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    },
    "strict": True,
}


async def test_tool_loop_with_required_choice(client: AsyncOpenAI) -> None:
    """tool_choice=required is a function_call item by construction (the grammar), streamed
    as OpenAI does; its output goes back with previous_response_id and the model answers."""
    body = greedy(
        input="What is the weather in Paris?",
        tools=[WEATHER],
        tool_choice="required",
        parallel_tool_calls=False,  # one call, then the grammar ends the reply
        max_output_tokens=40,
    )
    events = [e async for e in await client.responses.create(**body, stream=True)]
    kinds = [e.type for e in events]
    assert kinds[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert "response.function_call_arguments.done" in kinds and kinds[-1] == "response.completed"
    first = events[-1].response
    calls = [item for item in first.output if item.type == "function_call"]
    assert calls and all(item.type == "function_call" for item in first.output)
    call = calls[0]
    assert call.name == "get_weather" and call.call_id.startswith("call_")
    assert set(json.loads(call.arguments)) == {"city"}
    assert first.tools[0].name == "get_weather" and first.tool_choice == "required"
    second = await client.responses.create(
        **greedy(
            input=[{"type": "function_call_output", "call_id": call.call_id, "output": "Sunny"}],
            previous_response_id=first.id,
            tools=[WEATHER],
            tool_choice="none",
            max_output_tokens=16,
        )
    )
    assert second.output[0].type == "message" and second.output_text


# --- WebSocket mode -----------------------------------------------------------------------


async def until_terminal(conn: Any) -> list[Any]:
    events = []
    async for event in conn:
        events.append(event)
        if event.type in TERMINAL or event.type == "error":
            return events
    raise AssertionError("the socket closed before a terminal event")


async def test_websocket_chained_turns(client: AsyncOpenAI) -> None:
    async with client.responses.connect() as conn:
        await conn.response.create(
            **greedy(input="The secret word is banana.", max_output_tokens=16)
        )
        first = await until_terminal(conn)
        assert [e.type for e in first[:4]] == EVENTS and first[-1].type in TERMINAL
        assert [e.sequence_number for e in first] == list(range(len(first)))
        r1 = first[-1].response
        # store=False: the socket keeps its own latest responses to chain from.
        await conn.response.create(
            **greedy(
                input="What is the secret word?",
                previous_response_id=r1.id,
                max_output_tokens=16,
                store=False,
            )
        )
        r2 = (await until_terminal(conn))[-1].response
    assert "banana" in r2.output_text.lower() and r2.previous_response_id == r1.id
    assert r2.usage.input_tokens_details.cached_tokens >= 16
    http_chained = await client.responses.create(
        **greedy(input="What is the secret word?", previous_response_id=r1.id, max_output_tokens=16)
    )
    assert http_chained.output_text == r2.output_text
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(r2.id)


async def test_websocket_multiplexes_stream_ids(client: AsyncOpenAI) -> None:
    extra = {"ignore_eos": True}
    async with client.responses.connect() as conn:
        for lane, text in (("a", "Count to ten."), ("a", "Say yes."), ("b", "Say no.")):
            # A raw event: the SDK's create() has no extra_body for ignore_eos.
            await conn.send(
                {
                    "type": "response.create",
                    **greedy(input=text, max_output_tokens=4),
                    **extra,
                    "stream_id": lane,
                }
            )
        events: list[Any] = []
        # An error event ends the wait too (it would never be followed by a terminal one).
        while sum(e.type in TERMINAL or e.type == "error" for e in events) < 3:
            events.append(await conn.recv())
    assert all(e.type != "error" for e in events), [e for e in events if e.type == "error"]
    order = [
        (e.stream_id, e.type) for e in events if e.type == "response.created" or e.type in TERMINAL
    ]
    # Lane b runs beside a's first response; a's second waits for its first.
    a_done = order.index(("a", "response.incomplete"))
    assert order.index(("b", "response.created")) < a_done
    assert [kind for lane, kind in order if lane == "a"] == [
        "response.created",
        "response.incomplete",
        "response.created",
        "response.incomplete",
    ]
    for lane in ("a", "b"):
        mine = [e for e in events if e.stream_id == lane]
        ids = {e.response.id for e in mine if e.type == "response.created"}
        assert len(ids) == (2 if lane == "a" else 1)
        for rid in ids:
            seqs = [e.sequence_number for e in mine if _response_of(e, mine) == rid]
            assert seqs == list(range(len(seqs)))


def _response_of(event: Any, lane_events: list[Any]) -> str:
    """Which response of its lane an event belongs to (a lane's responses do not overlap)."""
    current = ""
    for e in lane_events:
        if e.type == "response.created":
            current = e.response.id
        if e is event:
            return current
    raise AssertionError


async def test_websocket_errors_and_close_cancels(
    http: aiohttp.ClientSession, exact_server: ServerProcess
) -> None:
    url = exact_server.url.replace("http", "ws") + "/v1/responses"
    async with http.ws_connect(url) as ws:
        await ws.send_json(
            {"type": "response.create", **greedy(input="Hi.", previous_response_id="resp_nope")}
        )
        error = await ws.receive_json()
        assert error["type"] == "error" and error["status"] == 400
        assert error["error"]["code"] == "previous_response_not_found"
        await ws.send_str("not json")
        assert (await ws.receive_json())["error"]["code"] == "invalid_json"
        await ws.send_json({"type": "response.create", "model": MODEL, "stream_id": "z"})
        error = await ws.receive_json()
        assert (error["error"]["param"], error["stream_id"]) == ("input", "z")
        # The socket still serves; closing it mid-reply cancels the generation.
        await ws.send_json(
            {
                "type": "response.create",
                **greedy(input="Tell a long story.", max_output_tokens=2000, ignore_eos=True),
            }
        )
        while (await ws.receive_json())["type"] != "response.output_text.delta":
            pass
        assert await generations(exact_server) >= 1
    await wait_no_generations(exact_server)


# --- logprobs ---------------------------------------------------------------------------

LOGPROBS = {"include": ["message.output_text.logprobs"], "top_logprobs": 2}


def _entries(logprobs: list[Any]) -> list[dict[str, Any]]:
    return [lp.model_dump() for lp in logprobs]


def assert_same_to_rounding(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> None:
    """The same tokens, top tokens and order; logprobs equal to 1e-4.

    Where ``exact_server`` is float32 (no C kernels), the second of two identical requests prefills only what the prefix
    cache lacks, a step of another size, and on the Intel(R) Xeon(R) Processor
    (torch CPU capability AVX512, VNNI avx_vnni) MKL computes 2-15 rows with
    another kernel than 16 or more: logprobs then differ in the sixth digit
    (README, Batch invariance).
    """

    def tokens(e: dict[str, Any]) -> tuple[Any, ...]:
        return (e["token"], e["bytes"], [(t["token"], t["bytes"]) for t in e["top_logprobs"]])

    def logprobs(e: dict[str, Any]) -> list[float]:
        return [e["logprob"], *(t["logprob"] for t in e["top_logprobs"])]

    assert [tokens(e) for e in a] == [tokens(e) for e in b]
    assert [logprobs(e) for e in a] == [pytest.approx(logprobs(e), abs=1e-4) for e in b]


async def test_logprobs_seeded_streamed_and_stored(client: AsyncOpenAI) -> None:
    """Seeded sampling gives the same logprobs twice; the tokens spell the text; the
    stream's deltas carry the same entries as the answer; GET returns them stored."""
    body = {
        "model": MODEL,
        "instructions": INSTRUCTIONS,
        "input": "Name a fruit.",
        "temperature": 0.9,
        "max_output_tokens": 8,
        **LOGPROBS,
    }
    first = await client.responses.create(**body, extra_body={"seed": 11})
    again = await client.responses.create(**body, extra_body={"seed": 11})
    [part] = first.output[0].content
    entries = _entries(part.logprobs)
    assert first.top_logprobs == 2 and 0 < len(entries) <= 8
    assert_same_to_rounding(entries, _entries(again.output[0].content[0].logprobs))
    assert "".join(e["token"] for e in entries) == part.text == again.output_text
    for e in entries:
        assert e["logprob"] <= 0 and bytes(e["bytes"]).decode(errors="replace") == e["token"]
        assert len(e["top_logprobs"]) == 2
        assert e["top_logprobs"][0]["logprob"] >= e["top_logprobs"][1]["logprob"]
    events = [
        e async for e in await client.responses.create(**body, stream=True, extra_body={"seed": 11})
    ]
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert "".join(d.delta for d in deltas) == part.text
    # Each delta carries its tokens' entries (the SDK keeps the bytes its type omits).
    streamed = [lp.model_dump() for d in deltas for lp in d.logprobs]
    assert_same_to_rounding(streamed, entries)
    assert _entries(events[-1].response.output[0].content[0].logprobs) == streamed
    done = next(e for e in events if e.type == "response.content_part.done")
    assert _entries(done.part.logprobs) == streamed
    stored = await client.responses.retrieve(first.id)
    assert _entries(stored.output[0].content[0].logprobs) == entries
    # Without include, no logprobs (OpenAI's empty list).
    plain = await client.responses.create(**greedy(input="Hi.", max_output_tokens=2))
    assert plain.output[0].content[0].logprobs == [] and plain.top_logprobs == 0


async def test_logprobs_bounds_and_refusals(client: AsyncOpenAI) -> None:
    for extra, code, param in [
        ({"top_logprobs": 21}, "invalid_parameter", "top_logprobs"),
        ({"top_logprobs": -1}, "invalid_parameter", "top_logprobs"),
        ({"top_logprobs": "2"}, "invalid_parameter", "top_logprobs"),
        ({"include": ["reasoning.encrypted_content"]}, "unsupported_parameter", "include"),
        ({"include": "message.output_text.logprobs"}, "invalid_field", "include"),
        (
            {**LOGPROBS, "tools": [WEATHER], "tool_choice": "required"},
            "unsupported_parameter",
            "include",
        ),
    ]:
        with pytest.raises(openai.BadRequestError) as info:
            await client.responses.create(
                **greedy(input="Hi.", max_output_tokens=2), extra_body=extra
            )
        assert (info.value.code, info.value.param) == (code, param), extra
    # top_logprobs alone asks for logprobs; 0 and 20 are the bounds.
    r = await client.responses.create(**greedy(input="Hi.", max_output_tokens=2), top_logprobs=20)
    assert all(len(e.top_logprobs) == 20 for e in r.output[0].content[0].logprobs)
    r = await client.responses.create(
        **greedy(input="Hi.", max_output_tokens=2), include=LOGPROBS["include"], top_logprobs=0
    )
    entries = r.output[0].content[0].logprobs
    assert entries and all(e.top_logprobs == [] for e in entries)


# --- input items --------------------------------------------------------------------------


async def test_input_items_listed_and_paginated(
    client: AsyncOpenAI, http: aiohttp.ClientSession, exact_server: ServerProcess
) -> None:
    given = [
        {"role": "developer", "content": "Be brief."},
        {"type": "message", "role": "user", "content": "a", "id": "msg_mine"},
        {"role": "assistant", "content": [{"type": "output_text", "text": "b"}]},
        {"role": "user", "content": [{"type": "input_text", "text": "c"}]},
        {"role": "user", "content": "d", "id": "msg_mine"},  # a duplicate id: a new one
    ]
    r = await client.responses.create(model=MODEL, input=given, max_output_tokens=2)
    listed = [item async for item in client.responses.input_items.list(r.id, limit=2)]
    asc = (await client.responses.input_items.list(r.id, order="asc")).data
    assert [i.id for i in listed] == [i.id for i in reversed(asc)]  # desc, the default
    assert [(i.role, i.content[0].text) for i in asc] == [
        ("developer", "Be brief."),
        ("user", "a"),
        ("assistant", "b"),
        ("user", "c"),
        ("user", "d"),
    ]
    assert asc[1].id == "msg_mine" and len({i.id for i in asc}) == 5
    assert [i.content[0].type for i in asc] == ["input_text"] * 2 + ["output_text"] + [
        "input_text"
    ] * 2
    page = await client.responses.input_items.list(r.id, order="asc", limit=2, after=asc[1].id)
    assert [i.id for i in page.data] == [asc[2].id, asc[3].id] and page.has_more
    assert (page.first_id, page.last_id) == (asc[2].id, asc[3].id)
    last = await client.responses.input_items.list(r.id, order="asc", after=asc[3].id)
    assert [i.id for i in last.data] == [asc[4].id] and not last.has_more
    # Stable: listed again, the same ids; a chained response lists its own input only.
    again = await client.responses.input_items.list(r.id, order="asc")
    assert [i.id for i in again.data] == [i.id for i in asc]
    call = {"type": "function_call", "call_id": "call_1", "name": "f", "arguments": "{}"}
    output = {"type": "function_call_output", "call_id": "call_1", "output": "42"}
    chained = await client.responses.create(
        model=MODEL, input=[call, output], previous_response_id=r.id, max_output_tokens=2
    )
    items = (await client.responses.input_items.list(chained.id, order="asc")).data
    assert [(i.type, i.call_id) for i in items] == [
        ("function_call", "call_1"),
        ("function_call_output", "call_1"),
    ]
    assert items[0].id.startswith("fc_") and items[1].output == "42"
    with pytest.raises(openai.NotFoundError):
        await client.responses.input_items.list("resp_doesnotexist")
    await client.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError):
        await client.responses.input_items.list(r.id)
    url = f"{exact_server.url}/v1/responses/{chained.id}/input_items"
    for query, param in [
        ("limit=0", "limit"),
        ("limit=101", "limit"),
        ("limit=x", "limit"),
        ("order=sideways", "order"),
        ("after=msg_unknown", "after"),
        ("include[]=file_search_call.results", "include"),
    ]:
        async with http.get(f"{url}?{query}") as resp:
            error = (await resp.json())["error"]
            assert (resp.status, error["param"]) == (400, param), query
            assert error["type"] == "invalid_request_error"
    async with http.get(f"{url}?include[]=message.output_text.logprobs&limit=100") as resp:
        assert resp.status == 200 and len((await resp.json())["data"]) == 2
    async with http.get(exact_server.url + "/v1/responses/resp_nope/input_items") as resp:
        error = (await resp.json())["error"]
        assert resp.status == 404 and error["code"] == "not_found" and error["message"]
