"""``n`` > 1 on /v1/chat/completions and /v1/completions (api/openai/choices.py).

Against real servers with the real model: the batch-invariant ``exact_server`` (seeded
samples compared across requests must be the same text), and a small server of
this module's own (2 running slots, 2 queue places, API keys, a token rate
limit) for admission, rate limits and a killed worker.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import jsonschema
import openai
import pytest
from openai import AsyncOpenAI

from chatserver.api.openai.protocol import parse_chat_completion, parse_completion
from chatserver.errors import ApiError
from tests.serverproc import ServerProcess, generations, wait_no_generations
from tests.test_engine import worker_pids

MODEL = "SmolLM2-135M-Instruct"
POEM = [{"role": "user", "content": "Write a short poem about the sea."}]
TOKENS = 10


@pytest.fixture
async def client(exact_server: ServerProcess) -> AsyncIterator[AsyncOpenAI]:
    async with AsyncOpenAI(
        base_url=exact_server.url + "/v1", api_key="x", max_retries=0, timeout=120
    ) as c:
        yield c


async def poem(client: AsyncOpenAI, n: int, seed: int, **extra: Any) -> Any:
    return await client.chat.completions.create(
        model=MODEL,
        messages=POEM,
        n=n,
        seed=seed,
        temperature=1.0,
        max_tokens=TOKENS,
        **extra,
    )


def assert_same_logprobs(streamed: list[dict[str, Any]], whole: list[dict[str, Any]]) -> None:
    """Same tokens, same logprobs up to rounding: the second request finds the prompt
    cached and prefills less of it, so where ``exact_server`` is float32 (no C kernels)
    its sums come out in another order."""
    assert [(e["token"], e["bytes"]) for e in streamed] == [(e["token"], e["bytes"]) for e in whole]
    for s, w in zip(streamed, whole, strict=True):
        assert s["logprob"] == pytest.approx(w["logprob"], rel=1e-4, abs=1e-4)


async def sse(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> list[Any]:
    """The data of every event of a streamed completion, ``[DONE]`` as the string."""
    async with http.post(url, json=body) as r:
        assert r.status == 200, await r.text()
        raw = (await r.read()).decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events), events
    return [e[6:] if e == "data: [DONE]" else json.loads(e[6:]) for e in events]


# --- the request, without a server -------------------------------------------------


@pytest.mark.parametrize("n", [True, False, 1.5, "2", 0, -1, 17, [2], {}])
def test_bad_n_is_refused(n: Any) -> None:
    for parse, body in (
        (parse_chat_completion, {"model": "m", "messages": POEM, "n": n}),
        (parse_completion, {"model": "m", "prompt": "x", "n": n}),
    ):
        with pytest.raises(ApiError) as info:
            parse(body)
        assert (info.value.status, info.value.code, info.value.param) == (
            400,
            "invalid_parameter",
            "n",
        )


def test_n_and_best_of_are_read() -> None:
    assert parse_chat_completion({"model": "m", "messages": POEM}).n == 1
    assert parse_chat_completion({"model": "m", "messages": POEM, "n": None}).n == 1
    assert parse_chat_completion({"model": "m", "messages": POEM, "n": 16}).n == 16
    assert parse_chat_completion({"model": "m", "messages": POEM, "n": 3.0}).n == 3
    assert parse_completion({"model": "m", "prompt": "x", "n": 2, "best_of": 2}).n == 2
    assert parse_completion({"model": "m", "prompt": "x", "best_of": 1}).n == 1
    assert parse_completion({"model": "m", "prompt": "x", "n": 4, "best_of": None}).n == 4
    for body, code in (
        ({"n": 2, "best_of": 3}, "unsupported_parameter"),
        ({"best_of": 2}, "unsupported_parameter"),
        ({"n": 2, "best_of": 1}, "unsupported_parameter"),
        ({"n": 2, "best_of": True}, "invalid_parameter"),
        ({"n": 2, "best_of": 0}, "invalid_parameter"),
    ):
        with pytest.raises(ApiError) as info:
            parse_completion({"model": "m", "prompt": "x", **body})
        assert (info.value.code, info.value.param) == (code, "best_of"), body


# --- over a real socket ------------------------------------------------------------


async def test_seeded_choices_are_reproducible_and_differ(client: AsyncOpenAI) -> None:
    first = await poem(client, 3, seed=11)
    again = await poem(client, 3, seed=11)
    assert [c.index for c in first.choices] == [0, 1, 2]
    texts = [c.message.content for c in first.choices]
    assert texts == [c.message.content for c in again.choices]
    assert len(set(texts)) > 1, texts
    assert all(c.finish_reason in ("stop", "length") for c in first.choices)
    # Choice i samples with seed + i: the same text as a request for one choice.
    second = await poem(client, 1, seed=12)
    assert second.choices[0].message.content == texts[1]
    # The prompt counts once, the completions of all choices add up.
    singles = [await poem(client, 1, seed=11 + i) for i in range(3)]
    assert first.usage.prompt_tokens == singles[0].usage.prompt_tokens
    assert first.usage.completion_tokens == sum(s.usage.completion_tokens for s in singles)
    assert first.usage.total_tokens == first.usage.prompt_tokens + first.usage.completion_tokens


async def test_usage_sums_the_choices(client: AsyncOpenAI) -> None:
    reply = await poem(client, 4, seed=5, extra_body={"ignore_eos": True})
    assert [c.finish_reason for c in reply.choices] == ["length"] * 4
    one = await poem(client, 1, seed=5, extra_body={"ignore_eos": True})
    assert reply.usage.prompt_tokens == one.usage.prompt_tokens
    assert (one.usage.completion_tokens, reply.usage.completion_tokens) == (TOKENS, 4 * TOKENS)


async def test_greedy_choices_are_the_same(client: AsyncOpenAI) -> None:
    reply = await client.chat.completions.create(
        model=MODEL, messages=POEM, n=2, temperature=0, max_tokens=6
    )
    assert reply.choices[0].message.content == reply.choices[1].message.content


async def test_stream_reassembled_per_index_is_the_reply(exact_server: ServerProcess) -> None:
    body = {
        "model": MODEL,
        "messages": POEM,
        "n": 3,
        "seed": 23,
        "temperature": 1.0,
        "max_tokens": TOKENS,
        "logprobs": True,
    }
    url = exact_server.url + "/v1/chat/completions"
    async with aiohttp.ClientSession() as http:
        async with http.post(url, json=body) as r:
            whole = await r.json()
        events = await sse(
            http, url, {**body, "stream": True, "stream_options": {"include_usage": True}}
        )
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
    *chunks, usage = events[:-1]
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")  # cached_tokens: run order
    assert usage["choices"] == []
    assert {k: usage["usage"][k] for k in counts} == {k: whole["usage"][k] for k in counts}
    texts, roles, finishes, logprobs = ["", "", ""], [0, 0, 0], [0, 0, 0], [[], [], []]
    for chunk in chunks:
        (choice,) = chunk["choices"]
        i = choice["index"]
        assert finishes[i] == 0, "a chunk after its choice's finish_reason"
        delta = choice["delta"]
        roles[i] += delta.get("role") == "assistant"
        texts[i] += delta.get("content") or ""
        if choice["logprobs"]:
            logprobs[i] += choice["logprobs"]["content"]
        if choice["finish_reason"] is not None:
            finishes[i] += 1
            assert choice["finish_reason"] == whole["choices"][i]["finish_reason"]
    assert roles == [1, 1, 1] and finishes == [1, 1, 1]
    assert texts == [c["message"]["content"] for c in whole["choices"]]
    # Each choice's logprobs are its own tokens', streamed and not.
    for i, choice in enumerate(whole["choices"]):
        assert_same_logprobs(logprobs[i], choice["logprobs"]["content"])
        assert "".join(e["token"] for e in logprobs[i]) == texts[i]


async def test_text_completions_with_n(exact_server: ServerProcess, client: AsyncOpenAI) -> None:
    kwargs: dict[str, Any] = {"prompt": "Once upon a time", "max_tokens": 8, "seed": 3}
    done = await client.completions.create(model=MODEL, n=2, temperature=1.0, **kwargs)
    assert [c.index for c in done.choices] == [0, 1]
    assert all(c.text for c in done.choices)
    same = await client.completions.create(
        model=MODEL, n=2, temperature=1.0, extra_body={"best_of": 2}, **kwargs
    )
    assert [c.text for c in same.choices] == [c.text for c in done.choices]
    one = await client.completions.create(model=MODEL, temperature=1.0, **kwargs)
    assert done.usage.prompt_tokens == one.usage.prompt_tokens
    async with aiohttp.ClientSession() as http:
        events = await sse(
            http,
            exact_server.url + "/v1/completions",
            {"model": MODEL, "n": 2, "temperature": 1.0, "stream": True, **kwargs},
        )
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
    texts = ["", ""]
    for event in events[:-1]:
        (choice,) = event["choices"]
        texts[choice["index"]] += choice["text"]
    assert texts == [c.text for c in done.choices]


async def test_each_choice_keeps_to_the_schema(client: AsyncOpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"mood": {"enum": ["calm", "stormy", "grey"]}, "waves": {"type": "integer"}},
        "required": ["mood", "waves"],
        "additionalProperties": False,
    }
    reply = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Describe the sea as JSON."}],
        n=3,
        seed=1,
        temperature=1.0,
        max_tokens=24,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "sea", "schema": schema, "strict": True},
        },
    )
    assert len(reply.choices) == 3
    for choice in reply.choices:
        assert choice.finish_reason == "stop", choice
        jsonschema.validate(json.loads(choice.message.content), schema)


async def test_each_choice_calls_a_tool(client: AsyncOpenAI) -> None:
    weather = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 12}},
                "required": ["city"],
            },
        },
    }
    reply = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        n=2,
        seed=2,
        temperature=1.0,
        max_tokens=40,
        tools=[weather],
        tool_choice="required",
        parallel_tool_calls=False,
    )
    for choice in reply.choices:
        assert choice.finish_reason == "tool_calls", choice
        (call,) = choice.message.tool_calls
        assert call.function.name == "get_weather"
        assert isinstance(json.loads(call.function.arguments)["city"], str)


async def test_shared_prompt_is_prefilled_once(exact_server: ServerProcess) -> None:
    """The n generations go to one worker at once, whose scheduler prefills their
    prompt once: choices 1..n-1 find it in the prefix cache."""
    words = " ".join(f"{uuid.uuid4().hex[:6]}" for _ in range(60))
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"Repeat these codes: {words}"}],
        "n": 3,
        "max_tokens": 1,
    }
    async with aiohttp.ClientSession() as http:
        hits = await prefix_hits(http, exact_server)
        async with http.post(exact_server.url + "/v1/chat/completions", json=body) as r:
            usage = (await r.json())["usage"]
        hits = await prefix_hits(http, exact_server) - hits
    prompt = usage["prompt_tokens"]
    assert prompt > 200
    # The prompt's cached tokens: those no choice computed (a shared template start).
    assert usage["prompt_tokens_details"]["cached_tokens"] < 64
    # Two of the three choices copied all of it but the last, partial, block.
    assert hits >= 2 * (prompt - 16), (hits, prompt)


async def prefix_hits(http: aiohttp.ClientSession, server: ServerProcess) -> float:
    async with http.get(server.url + "/metrics") as r:
        for line in (await r.text()).splitlines():
            if line.startswith("chatserver:prefix_cache_hits_total "):
                return float(line.split()[1])
    raise AssertionError("no prefix_cache_hits_total in /metrics")


async def test_bad_n_over_http(client: AsyncOpenAI, exact_server: ServerProcess) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(model=MODEL, messages=POEM, n=17)
    assert (info.value.code, info.value.param) == ("invalid_parameter", "n")
    async with aiohttp.ClientSession() as http:
        for n in (True, 2.5, "3", 0):
            body = {"model": MODEL, "messages": POEM, "n": n}
            async with http.post(exact_server.url + "/v1/chat/completions", json=body) as r:
                error = (await r.json())["error"]
            assert (r.status, error["param"], error["type"]) == (
                400,
                "n",
                "invalid_request_error",
            ), n


async def test_disconnect_cancels_every_choice(exact_server: ServerProcess) -> None:
    body = {
        "model": MODEL,
        "messages": POEM,
        "n": 3,
        "max_tokens": 2000,
        "ignore_eos": True,
        "stream": True,
    }
    async with aiohttp.ClientSession() as http:
        async with http.post(exact_server.url + "/v1/chat/completions", json=body) as r:
            assert r.status == 200
            seen: set[int] = set()
            async for line in r.content:
                if line.startswith(b"data: {"):
                    choice = json.loads(line[6:])["choices"][0]
                    if choice["delta"].get("content"):
                        seen.add(choice["index"])
                if seen == {0, 1, 2}:
                    break
            assert await generations(exact_server) == 3
        # Leaving the block closes the connection mid-stream.
    await wait_no_generations(exact_server)


# --- admission, rate limits, failures: a small server of this module's own ---------

BUSY_KEY, LONG_KEY, RATE_KEY = "busy-key", "long-key", "rate-key"
TOKEN_RATE = 20


@pytest.fixture(scope="module")
def small_server() -> Iterator[ServerProcess]:
    """1 worker, 2 running slots and 2 queue places (4 generations at once), a key per
    test so that one's tokens are not another's limit."""
    proc = ServerProcess(
        "--engine",
        "pool",
        "--workers",
        "1",
        "--max-running",
        "2",
        "--max-queue",
        "2",
        "--token-rate-limit",
        str(TOKEN_RATE),
        "--api-key",
        BUSY_KEY,
        "--api-key",
        LONG_KEY,
        "--api-key",
        RATE_KEY,
        "--skip-quality-gate",
        "--log-level",
        "warning",
    ).wait_ready()
    yield proc
    proc.stop()


async def post(
    http: aiohttp.ClientSession, server: ServerProcess, key: str, body: dict[str, Any]
) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {key}"}
    async with http.post(server.url + "/v1/chat/completions", json=body, headers=headers) as r:
        return r.status, await r.json()


async def test_n_counts_as_n_generations_in_admission(small_server: ServerProcess) -> None:
    short = {"model": MODEL, "messages": POEM, "max_tokens": 2}
    async with aiohttp.ClientSession() as http:
        status, body = await post(http, small_server, BUSY_KEY, {**short, "n": 5})
        assert (status, body["error"]["param"]) == (400, "n"), body
        long = {**short, "max_tokens": 2000, "ignore_eos": True, "stream": True}
        headers = {"Authorization": f"Bearer {LONG_KEY}"}
        url = small_server.url + "/v1/chat/completions"
        async with http.post(url, json=long, headers=headers) as running:
            assert running.status == 200
            await running.content.readline()
            # 1 running + 4 > 4 places: the whole request is refused, nothing starts.
            status, body = await post(http, small_server, BUSY_KEY, {**short, "n": 4})
            assert (status, body["error"]["code"]) == (503, "server_busy"), body
            assert await generations(small_server) == 1
            # 1 + 3 fits exactly.
            status, body = await post(http, small_server, BUSY_KEY, {**short, "n": 3})
            assert status == 200 and len(body["choices"]) == 3, body
        await wait_no_generations(small_server)


async def test_rate_limit_charges_every_choice(small_server: ServerProcess) -> None:
    body = {"model": MODEL, "messages": POEM, "max_tokens": 10, "ignore_eos": True}
    async with aiohttp.ClientSession() as http:
        status, reply = await post(http, small_server, RATE_KEY, {**body, "n": 3})
        assert status == 200 and reply["usage"]["completion_tokens"] == 30, reply
        # 30 tokens of 20 a minute: the next request waits for the debt to refill
        # (one choice's 10 would have left 10).
        status, refused = await post(http, small_server, RATE_KEY, body)
        assert (status, refused["error"]["code"]) == (429, "rate_limited"), refused


async def test_a_failed_choice_fails_the_request(small_server: ServerProcess) -> None:
    """A killed worker: the unstreamed request is the same error as with one choice, the
    streamed one ends with an error event and one [DONE]."""
    body = {"model": MODEL, "messages": POEM, "max_tokens": 2000, "ignore_eos": True, "n": 2}
    headers = {"Authorization": f"Bearer {BUSY_KEY}"}
    url = small_server.url + "/v1/chat/completions"
    async with aiohttp.ClientSession() as http:

        async def whole() -> tuple[int, dict[str, Any]]:
            async with http.post(url, json=body, headers=headers) as r:
                return r.status, await r.json()

        # The streamed request takes both running slots first and the other waits for
        # them: sent together, the unstreamed one could win the slots and run its 2000
        # tokens to the end before the stream began (a fresh clone's make test, and 1 of 3
        # runs of this module).
        unstreamed = None
        async with http.post(url, json={**body, "stream": True}, headers=headers) as r:
            assert r.status == 200
            events = []
            async for line in r.content:
                if not line.startswith(b"data: "):
                    continue
                events.append(line[6:].strip())
                if len(events) == 1:
                    unstreamed = asyncio.create_task(whole())
                if len(events) == 6:
                    await wait_generations(small_server, 4)
                    (worker,) = worker_pids(small_server.proc.pid)
                    os.kill(worker, signal.SIGKILL)
        assert unstreamed is not None
        status, error = await unstreamed
    assert (status, error["error"]["code"]) == (503, "worker_failed"), error
    assert events[-1] == b"[DONE]" and events.count(b"[DONE]") == 1
    assert json.loads(events[-2])["error"]["code"] == "worker_failed", events[-3:]
    await wait_no_generations(small_server)


async def wait_generations(server: ServerProcess, count: int, within: float = 10.0) -> None:
    for _ in range(int(within / 0.05)):
        if await generations(server) == count:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"not {count} generations under way")
