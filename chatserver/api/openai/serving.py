"""Chat completions on the engine: the prompt is exactly the client's messages.

Stateless (no session store) and never truncated: a conversation that does not
fit the context is the client's to shorten, so it gets 400
``context_length_exceeded`` rather than a silently edited prompt.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from chatserver.api.openai import protocol
from chatserver.api.openai.protocol import ChatCompletionRequest
from chatserver.config import Settings
from chatserver.engine.errors import ReplyInterrupted
from chatserver.errors import ApiError
from chatserver.limits import InFlight

if TYPE_CHECKING:
    from chatserver.api.ratelimit import ClientLimits
    from chatserver.engine.engine import GenerationStream, InferenceEngine


def check_openai(stream: GenerationStream) -> None:
    """stream.check(), and an interrupted reply is an error too: OpenAI's finish
    reasons cannot say "cut short by the server", and "stop" would pass it off
    as complete."""
    stream.check()
    if stream.finish_reason == "interrupted":
        raise ReplyInterrupted()


class OpenAIServing:
    def __init__(self, engine: InferenceEngine, settings: Settings, inflight: InFlight) -> None:
        self.engine = engine
        self.settings = settings
        self.inflight = inflight
        self.created = int(time.time())

    def models(self) -> dict[str, Any]:
        return protocol.model_list(self.engine.model_id, self.created, self._precision())

    def model(self, model_id: str) -> dict[str, Any]:
        self.check_model(model_id)
        return protocol.model_card(model_id, self.created, self._precision())

    def _precision(self) -> dict[str, Any]:
        """The serving precision without the gate's per-candidate detail (that is in /readyz)."""
        return {k: v for k, v in self.engine.precision.items() if k != "quality_gate"}

    def check_model(self, model: str) -> None:
        if model != self.engine.model_id:
            raise ApiError(
                404,
                "model_not_found",
                f"the model {model!r} does not exist; this server serves {self.engine.model_id!r}",
                "model",
            )

    @asynccontextmanager
    async def completion(
        self, request: ChatCompletionRequest, limits: ClientLimits
    ) -> AsyncIterator[GenerationStream]:
        """One completion, start to end: rate limits (before any prompt work), start,
        and the stream's lifetime; leaving early cancels it, its tokens are charged."""
        await limits.admit()
        stream = await self.start(request)
        async with limits.metered(stream):
            yield stream

    async def start(self, request: ChatCompletionRequest) -> GenerationStream:
        """Check the model, build the prompt and start generating; the caller enters the stream.

        Raises model_not_found, ServerBusy (before the prompt is built), NotReady,
        context_length_exceeded.
        """
        self.check_model(request.model)
        return self.inflight.add(
            await self.engine.submit(request.messages, request.params, truncate=False)
        )

    async def complete(
        self, request: ChatCompletionRequest, stream: GenerationStream
    ) -> dict[str, Any]:
        """Drain an entered stream into one ``chat.completion`` object."""
        async for _ in stream:
            pass
        check_openai(stream)
        return protocol.chat_completion(
            protocol.completion_id(),
            int(time.time()),
            self.engine.model_id,
            stream.text,
            protocol.openai_finish_reason(stream.finish_reason),
            stream.prompt_tokens,
            stream.completion_tokens,
        )

    async def chunks(
        self, request: ChatCompletionRequest, stream: GenerationStream
    ) -> AsyncIterator[dict[str, Any] | None]:
        """The ``chat.completion.chunk`` objects for an entered stream, in OpenAI's order.

        None stands for a keep-alive: nothing to send for --keepalive-interval seconds.
        """
        id, created, model = protocol.completion_id(), int(time.time()), self.engine.model_id
        usage = request.include_usage
        yield protocol.chunk(id, created, model, {"role": "assistant", "content": ""}, None, usage)
        async for delta in stream.with_keepalive(self.settings.keepalive_interval):
            if delta is None:
                yield None
            elif delta:
                yield protocol.chunk(id, created, model, {"content": delta}, None, usage)
        check_openai(stream)
        reason = protocol.openai_finish_reason(stream.finish_reason)
        yield protocol.chunk(id, created, model, {}, reason, usage)
        if usage:
            yield protocol.usage_chunk(
                id, created, model, stream.prompt_tokens, stream.completion_tokens
            )
