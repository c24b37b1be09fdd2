"""Structured output and logprobs over a real server, through the official `openai` client.

What is guaranteed by construction is tested as a guarantee: every sampled
(temperature 1) reply under a JSON schema validates, a regex reply matches,
a bad schema is a 400 before anything runs; logprobs are checked against each
other and against seeded reproducibility, not against fixed numbers.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections.abc import AsyncIterator
from typing import Any

import jsonschema
import openai
import pytest
from openai import AsyncOpenAI
from pydantic import BaseModel, Field

from tests.serverproc import ServerProcess

MODEL = "SmolLM2-135M-Instruct"
SCHEMA = {
    "type": "object",
    "properties": {
        "colour": {"enum": ["red", "green", "blue"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 99},
        "ok": {"type": "boolean"},
        "name": {"type": "string", "maxLength": 8},
    },
    "required": ["colour", "count", "ok", "name"],
    "additionalProperties": False,
}
ASK = [{"role": "user", "content": "Describe a pet as JSON: colour, count, ok, name."}]
REPLY_TOKENS = 48  # room for any reply the schema allows (a name of 8 multi-token chars)


@pytest.fixture
async def client(exact_server: ServerProcess) -> AsyncIterator[AsyncOpenAI]:
    async with AsyncOpenAI(
        base_url=exact_server.url + "/v1", api_key="x", max_retries=0, timeout=600
    ) as c:
        yield c


def json_schema_format(schema: dict[str, Any], strict: bool = True) -> dict[str, Any]:
    return {
        "type": "json_schema",
        "json_schema": {"name": "pet", "schema": schema, "strict": strict},
    }


class Pet(BaseModel):
    name: str = Field(max_length=16)
    legs: int = Field(ge=0, le=8)
    kind: str = Field(pattern="^(cat|dog|bird)$")


async def test_parse_with_a_pydantic_model(client: AsyncOpenAI) -> None:
    done = await client.chat.completions.parse(
        model=MODEL,
        messages=[{"role": "user", "content": "Describe a pet."}],
        response_format=Pet,
        max_tokens=60,
    )
    pet = done.choices[0].message.parsed
    assert isinstance(pet, Pet), done.choices[0].message.content
    assert done.choices[0].finish_reason == "stop"


async def test_fifty_sampled_replies_all_valid(client: AsyncOpenAI) -> None:
    """Temperature 1, in one concurrent batch: each of 50 replies validates."""

    async def one(seed: int) -> tuple[str, str]:
        done = await client.chat.completions.create(
            model=MODEL,
            messages=ASK,
            response_format=json_schema_format(SCHEMA),  # type: ignore[arg-type]
            temperature=1.0,
            seed=seed,
            max_tokens=REPLY_TOKENS,
        )
        return done.choices[0].message.content or "", done.choices[0].finish_reason

    replies = await asyncio.gather(*(one(seed) for seed in range(50)))
    for content, reason in replies:
        assert reason == "stop", content
        jsonschema.validate(json.loads(content), SCHEMA)
    assert len({c for c, _ in replies}) > 5  # sampled, not one reply 50 times


async def test_json_object(client: AsyncOpenAI) -> None:
    done = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": 'Reply with the JSON object {"a": 1}.'}],
        response_format={"type": "json_object"},
        max_tokens=40,
    )
    content = done.choices[0].message.content or ""
    assert content.startswith("{"), content
    if done.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(content), dict)


async def test_regex_and_grammar_extensions(client: AsyncOpenAI) -> None:
    date = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "When did the Berlin wall fall?"}],
        response_format={"type": "regex", "regex": r"[12][0-9]{3}-[01][0-9]-[0-3][0-9]"},  # type: ignore[arg-type,typeddict-item]
        max_tokens=20,
    )
    assert re.fullmatch(r"[12][0-9]{3}-[01][0-9]-[0-3][0-9]", date.choices[0].message.content or "")
    assert date.choices[0].finish_reason == "stop"
    lark = 'start: "<answer>" ("yes" | "no") "</answer>"'
    answer = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Is water wet?"}],
        response_format={"type": "grammar", "grammar": lark},  # type: ignore[arg-type,typeddict-item]
        max_tokens=20,
        stream=False,
    )
    assert answer.choices[0].message.content in ("<answer>yes</answer>", "<answer>no</answer>")


@pytest.mark.parametrize(
    ("response_format", "param"),
    [
        (json_schema_format({"type": "objekt"}), "response_format"),
        (json_schema_format({"type": "string", "format": "no-such-format"}), "response_format"),
        ({"type": "regex", "regex": "(ab"}, "response_format"),
        ({"type": "grammar", "grammar": "start: missing"}, "response_format"),
        ({"type": "yaml"}, "response_format"),
        (
            {"type": "json_schema", "json_schema": {"schema": {}}},
            "response_format.json_schema.name",
        ),
    ],
)
async def test_invalid_formats_are_400(
    client: AsyncOpenAI, response_format: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(
            model=MODEL,
            messages=ASK,
            response_format=response_format,  # type: ignore[arg-type]
            max_tokens=4,
        )
    assert info.value.param == param, info.value.body
    assert info.value.type == "invalid_request_error"
    assert info.value.body["message"]  # type: ignore[index]


# --- logprobs ----------------------------------------------------------------------------


def check_entries(content: list[Any], k: int) -> None:
    for entry in content:
        assert entry.logprob <= 0 and bytes(entry.bytes).decode("utf-8", "replace") == entry.token
        top = [t.logprob for t in entry.top_logprobs]
        assert len(top) == k and top == sorted(top, reverse=True)
        assert sum(math.exp(v) for v in top) <= 1.0 + 1e-4
        same = [t for t in entry.top_logprobs if t.token == entry.token]
        if same:
            assert math.isclose(same[0].logprob, entry.logprob, abs_tol=1e-6)
        else:
            assert entry.logprob <= top[-1] + 1e-6  # not among the k most likely


async def test_logprobs_greedy_sampled_and_streamed(client: AsyncOpenAI) -> None:
    hello = [{"role": "user", "content": "Say hello."}]
    greedy = await client.chat.completions.create(
        model=MODEL, messages=hello, max_tokens=8, logprobs=True, top_logprobs=5
    )
    choice = greedy.choices[0]
    content = choice.logprobs.content  # type: ignore[union-attr]
    assert "".join(e.token for e in content) == choice.message.content
    check_entries(content, 5)
    for entry in content:  # greedy: the sampled token is the most likely one
        assert entry.top_logprobs[0].token == entry.token

    async def sampled() -> Any:
        return await client.chat.completions.create(
            model=MODEL,
            messages=hello,
            max_tokens=8,
            temperature=0.9,
            seed=11,
            logprobs=True,
            top_logprobs=3,
        )

    first, second = await sampled(), await sampled()
    a, b = first.choices[0].logprobs.content, second.choices[0].logprobs.content  # type: ignore[union-attr]
    check_entries(a, 3)
    assert [(e.token, round(e.logprob, 4)) for e in a] == [
        (e.token, round(e.logprob, 4)) for e in b
    ]

    streamed = await client.chat.completions.create(
        model=MODEL, messages=hello, max_tokens=8, logprobs=True, top_logprobs=5, stream=True
    )
    tokens, text = [], ""
    async for chunk in streamed:
        if chunk.choices and chunk.choices[0].logprobs is not None:
            tokens += chunk.choices[0].logprobs.content or []
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
    assert text == choice.message.content
    assert [(e.token, round(e.logprob, 4)) for e in tokens] == [
        (e.token, round(e.logprob, 4)) for e in content
    ]


async def test_logprobs_under_a_grammar_and_on_text_completions(client: AsyncOpenAI) -> None:
    done = await client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        response_format=json_schema_format(SCHEMA),  # type: ignore[arg-type]
        max_tokens=48,
        logprobs=True,
        top_logprobs=2,
    )
    content = done.choices[0].logprobs.content  # type: ignore[union-attr]
    assert "".join(e.token for e in content) == done.choices[0].message.content
    check_entries([e for e in content if len(e.top_logprobs) == 2], 2)
    legacy = await client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=5, logprobs=3
    )
    lp = legacy.choices[0].logprobs
    assert lp is not None and len(lp.tokens) == len(lp.token_logprobs) == 5  # type: ignore[arg-type]
    assert "".join(lp.tokens) == legacy.choices[0].text  # type: ignore[arg-type]
    assert lp.text_offset[0] == 0 and all(len(t) == 3 for t in lp.top_logprobs)  # type: ignore[index,union-attr]


async def test_a_constrained_neighbour_changes_nothing(client: AsyncOpenAI) -> None:
    """Batch-invariant greedy: the same text alone and beside constrained, logprob-asking rows."""
    plain = {"model": MODEL, "messages": ASK, "max_tokens": 24}
    alone = await client.chat.completions.create(**plain)  # type: ignore[call-overload]
    neighbours = [
        client.chat.completions.create(
            model=MODEL,
            messages=ASK,
            max_tokens=24,
            temperature=1.0,
            seed=seed,
            logprobs=True,
            response_format=json_schema_format(SCHEMA),  # type: ignore[arg-type]
        )
        for seed in range(3)
    ]
    together, *_ = await asyncio.gather(client.chat.completions.create(**plain), *neighbours)  # type: ignore[call-overload]
    assert together.choices[0].message.content == alone.choices[0].message.content
