"""Tool calling on /v1/chat/completions, through the official `openai` client.

A real batch-invariant server (conftest ``exact_server``: greedy replies compared
across requests must be the same text). The 135M model is weak, so what is tested is what is guaranteed:
``required`` and a named ``tool_choice`` produce calls whose arguments are valid
for their schema (constrained decoding); ``auto`` is tested with a history of
earlier calls the model copies, which also tests that such histories render.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import jsonschema
import openai
import pytest
from openai import AsyncOpenAI

from tests.serverproc import ServerProcess

MODEL = "SmolLM2-135M-Instruct"
WEATHER_PARAMS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "description": "The city's name."},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME_PARAMS = {
    "type": "object",
    "properties": {"hours_offset": {"type": "integer", "minimum": -12, "maximum": 14}},
    "required": ["hours_offset"],
}
TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather in a city.",
            "parameters": WEATHER_PARAMS,
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "The time at an offset from UTC.",
            "parameters": TIME_PARAMS,
        },
    },
]
SCHEMAS = {"get_weather": WEATHER_PARAMS, "get_time": TIME_PARAMS}
ASK = [{"role": "user", "content": "What is the weather like in Paris today?"}]


@pytest.fixture(scope="module")
def tools_server(exact_server: ServerProcess) -> ServerProcess:
    """The shared exact server (conftest): greedy texts here must not depend on the batch."""
    return exact_server


@pytest.fixture
async def client(tools_server: ServerProcess) -> AsyncIterator[AsyncOpenAI]:
    async with AsyncOpenAI(
        base_url=tools_server.url + "/v1", api_key="x", max_retries=0, timeout=120
    ) as c:
        yield c


def _valid_calls(message: Any, names: set[str]) -> list[tuple[str, dict[str, Any]]]:
    """The message's calls as (name, arguments), each checked against its schema."""
    assert message.tool_calls, message
    calls = []
    for call in message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in names
        arguments = json.loads(call.function.arguments)
        jsonschema.validate(arguments, SCHEMAS[call.function.name])
        calls.append((call.function.name, arguments))
    return calls


async def test_required_choice_makes_a_valid_call(client: AsyncOpenAI) -> None:
    done = await client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=64,
    )
    choice = done.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    calls = _valid_calls(choice.message, set(SCHEMAS))
    assert len(calls) == 1


async def test_named_choice_calls_that_function(client: AsyncOpenAI) -> None:
    """Asked about the weather but told to call get_time, the model calls get_time,
    as many times as it likes (parallel calls): this small model goes on until
    max_tokens, and the call it was cut short in is dropped, never content."""
    done = await client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        max_tokens=40,
    )
    choice = done.choices[0]
    assert choice.finish_reason in ("tool_calls", "length")
    assert choice.message.content is None
    calls = _valid_calls(choice.message, {"get_time"})
    assert calls and all(name == "get_time" for name, _ in calls)


async def test_streamed_calls_accumulate_to_the_non_streamed_result(client: AsyncOpenAI) -> None:
    kwargs: dict[str, Any] = dict(
        model=MODEL,
        messages=ASK,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=48,
    )
    whole = (await client.chat.completions.create(**kwargs)).choices[0]
    # The official client's stream helper accumulates the deltas into a message.
    async with client.chat.completions.stream(**kwargs) as stream:
        async for _ in stream:
            pass
        streamed = (await stream.get_final_completion()).choices[0]
    assert streamed.finish_reason == whole.finish_reason == "tool_calls"
    assert streamed.message.content == whole.message.content
    assert [(c.function.name, c.function.arguments) for c in streamed.message.tool_calls] == [
        (c.function.name, c.function.arguments) for c in whole.message.tool_calls
    ]
    # The raw deltas are in OpenAI's shape: a call's first names it, the next has
    # only its index and arguments.
    deltas = []
    async for chunk in await client.chat.completions.create(**kwargs, stream=True):
        if chunk.choices and chunk.choices[0].delta.tool_calls:
            deltas += [d.model_dump(exclude_none=True) for d in chunk.choices[0].delta.tool_calls]
    first, second = deltas[0], deltas[1]
    assert first["index"] == 0 and first["type"] == "function"
    assert first["id"].startswith("call_") and first["function"]["arguments"] == ""
    assert first["function"]["name"] == whole.message.tool_calls[0].function.name
    assert second == {
        "index": 0,
        "function": {"arguments": whole.message.tool_calls[0].function.arguments},
    }


def _few_shot() -> list[dict[str, Any]]:
    """Four earlier turns in which the assistant called get_weather (content null)."""
    history: list[dict[str, Any]] = []
    for i, city in enumerate(["Paris", "Berlin", "Madrid", "Oslo"]):
        arguments = json.dumps({"city": city, "unit": "celsius"})
        history += [
            {"role": "user", "content": f"What is the weather in {city}?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": f"call_{i}",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": arguments},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": f"call_{i}", "content": "sunny, 20 C"},
            {"role": "assistant", "content": f"It is sunny and 20 C in {city}."},
        ]
    return history + [{"role": "user", "content": "What is the weather in Rome?"}]


async def test_auto_parses_the_call_the_model_makes(client: AsyncOpenAI) -> None:
    """Under auto nothing is forced: the reply is parsed. Following the earlier calls
    in its history, the model calls get_weather; streamed, the same call arrives."""
    kwargs: dict[str, Any] = dict(
        model=MODEL, messages=_few_shot(), tools=TOOLS, max_tokens=40, temperature=0
    )
    whole = (await client.chat.completions.create(**kwargs)).choices[0]
    assert whole.finish_reason == "tool_calls" and whole.message.content is None
    assert _valid_calls(whole.message, {"get_weather"}) == [
        ("get_weather", {"city": "Rome", "unit": "celsius"})
    ]
    async with client.chat.completions.stream(**kwargs) as stream:
        async for _ in stream:
            pass
        streamed = (await stream.get_final_completion()).choices[0]
    assert streamed.finish_reason == "tool_calls"
    assert [(c.function.name, c.function.arguments) for c in streamed.message.tool_calls] == [
        (c.function.name, c.function.arguments) for c in whole.message.tool_calls
    ]


async def test_a_two_turn_tool_loop(client: AsyncOpenAI) -> None:
    """Turn 1 calls a tool; turn 2 sends back the call (content null) and its result
    and gets a reply. Both are in the prompt: a longer result costs its tokens."""
    first = await client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        parallel_tool_calls=False,
        max_tokens=64,
    )
    message = first.choices[0].message
    (call,) = message.tool_calls
    history = [*ASK, message.model_dump(exclude_none=True)]
    assert history[-1].get("content") is None  # sent back as the client has it
    usage = []
    for result in ("sunny", "sunny" + " sunny" * 20):
        second = await client.chat.completions.create(
            model=MODEL,
            messages=[*history, {"role": "tool", "tool_call_id": call.id, "content": result}],
            tools=TOOLS,
            max_tokens=16,
        )
        reply = second.choices[0]
        assert reply.message.content or reply.message.tool_calls
        assert reply.finish_reason in ("stop", "length", "tool_calls")
        usage.append(second.usage.prompt_tokens)
    assert usage[0] > first.usage.prompt_tokens + first.usage.completion_tokens
    assert usage[1] - usage[0] == 20  # " sunny" is one token


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]},
            "tools[0].function.parameters",
        ),
        ({"tools": [{"type": "code_interpreter"}]}, "tools[0]"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
         "tool_choice"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": TOOLS, "parallel_tool_calls": "no"}, "parallel_tool_calls"),
    ],
)  # fmt: skip
async def test_bad_tools_are_400(client: AsyncOpenAI, kwargs: dict[str, Any], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=2, **kwargs)
    assert info.value.param == param, info.value.body
    assert info.value.type == "invalid_request_error"


async def test_bad_tool_histories_are_400(client: AsyncOpenAI) -> None:
    bad: list[tuple[list[Any], str]] = [
        ([*ASK, {"role": "tool", "content": "sunny"}], "messages[1].tool_call_id"),
        ([*ASK, {"role": "assistant", "content": None}], "messages[1].content"),
        (
            [*ASK, {"role": "assistant", "content": None, "tool_calls": [{"type": "function"}]}],
            "messages[1].tool_calls[0].function",
        ),
    ]
    for messages, param in bad:
        with pytest.raises(openai.BadRequestError) as info:
            await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
        assert info.value.param == param, info.value.body
    ok = await client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=2)
    assert ok.choices[0].message.content
