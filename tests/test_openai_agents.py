"""openai-agents (the OpenAI Agents SDK) against a real chatserver, over /v1/responses.

The SDK's defaults, not ours: its Responses model over HTTP (a function tool
with ``tool_choice="required"``, a pydantic ``output_type``) and its
``responses_websocket_session()`` (WebSocket mode, turns chained by
``previous_response_id``). On the batch-invariant server (conftest ``exact_server``) so
the greedy replies repeat. Tracing is off: it would post to OpenAI.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from agents import (
    Agent,
    ModelSettings,
    OpenAIResponsesModel,
    Runner,
    function_tool,
    responses_websocket_session,
    set_tracing_disabled,
)
from openai import AsyncOpenAI
from pydantic import BaseModel

from tests.serverproc import ServerProcess

MODEL = "SmolLM2-135M-Instruct"
INSTRUCTIONS = "You are a helpful assistant."
# The model stops at its end token or a full stop, so replies complete (the SDK
# raises on a response that ran out of max_output_tokens).
SETTINGS = ModelSettings(temperature=0, max_tokens=48, extra_body={"stop": ["."]})

set_tracing_disabled(True)


@pytest.fixture
async def client(exact_server: ServerProcess) -> AsyncIterator[AsyncOpenAI]:
    async with AsyncOpenAI(
        base_url=exact_server.url + "/v1", api_key="x", max_retries=0, timeout=120
    ) as c:
        yield c


def responses_model(client: AsyncOpenAI) -> OpenAIResponsesModel:
    return OpenAIResponsesModel(model=MODEL, openai_client=client)


async def test_agent_tool_loop_over_responses(client: AsyncOpenAI) -> None:
    calls: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        calls.append(city)
        return f"It is sunny in {city}."

    agent = Agent(
        name="weather",
        instructions=INSTRUCTIONS,
        model=responses_model(client),
        tools=[get_weather],
        model_settings=ModelSettings(
            temperature=0, max_tokens=48, tool_choice="required", parallel_tool_calls=False
        ),
        # The tool's answer is the run's: the loop is call, run, result.
        tool_use_behavior="stop_on_first_tool",
    )
    result = await Runner.run(agent, "What is the weather in Paris?", max_turns=2)
    assert len(calls) == 1 and calls[0]
    assert result.final_output == f"It is sunny in {calls[0]}."
    stored = await client.responses.retrieve(result.last_response_id)
    assert [item.type for item in stored.output] == ["function_call"]
    assert stored.output[0].name == "get_weather"


class City(BaseModel):
    name: str
    country: str


async def test_agent_output_type_parses(client: AsyncOpenAI) -> None:
    agent = Agent(
        name="geo",
        instructions=INSTRUCTIONS,
        model=responses_model(client),
        output_type=City,
        model_settings=ModelSettings(temperature=0, max_tokens=48),
    )
    result = await Runner.run(agent, "Name a city in France.")
    assert isinstance(result.final_output, City) and result.final_output.name


async def test_websocket_session_chains_two_turns(
    client: AsyncOpenAI, exact_server: ServerProcess
) -> None:
    agent = Agent(name="memory", instructions=INSTRUCTIONS, model=MODEL, model_settings=SETTINGS)
    async with responses_websocket_session(api_key="x", base_url=exact_server.url + "/v1") as ws:
        first = await ws.run(agent, "The secret word is banana.")
        second = await ws.run(
            agent, "What is the secret word?", previous_response_id=first.last_response_id
        )
    assert "banana" in second.final_output.lower()
    chained = await client.responses.retrieve(second.last_response_id)
    assert chained.previous_response_id == first.last_response_id
    assert chained.usage.input_tokens_details.cached_tokens > 0
