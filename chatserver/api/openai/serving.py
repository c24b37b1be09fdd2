"""Chat and text completions on the engine: the prompt is exactly the client's.

Chat completions render the client's messages through the chat template; text
completions (legacy ``/v1/completions``) tokenize the client's text as it is.
Stateless (no session store) and never truncated: a prompt that does not fit
the context is the client's to shorten, so it gets 400
``context_length_exceeded`` rather than a silently edited prompt.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from chatserver.api.openai import protocol, structured
from chatserver.api.openai.protocol import (
    AnyCompletionRequest,
    CompletionRequest,
)
from chatserver.api.openai.tools import tool_call_deltas
from chatserver.config import Settings
from chatserver.engine.errors import NotReady, ReplyInterrupted
from chatserver.engine.types import Prompt
from chatserver.errors import ApiError, bad_request
from chatserver.limits import InFlight
from chatserver.models.tools import ToolCall
from chatserver.protocol.sampling import RequestParams

if TYPE_CHECKING:
    from chatserver.api.ratelimit import ClientLimits
    from chatserver.engine.engine import GenerationStream, InferenceEngine


def usage_of(stream: GenerationStream) -> dict[str, Any]:
    return protocol.usage(stream.prompt_tokens, stream.completion_tokens, stream.cached_tokens)


def check_openai(stream: GenerationStream) -> None:
    """stream.check(), and an interrupted reply is an error too: OpenAI's finish
    reasons cannot say "cut short by the server", and "stop" would pass it off
    as complete."""
    stream.check()
    if stream.finish_reason == "interrupted":
        raise ReplyInterrupted()


def text_prompt(
    tokenizer: Any, text: str, max_tokens: int, max_context: int, max_token_chars: int = 0
) -> Prompt:
    """A raw text prompt's ids: no chat template; the tokenizer's own special tokens
    (a BOS, if it adds one) and any typed in the text count, as in OpenAI's API,
    since the client writes the whole prompt. Runs in the tokenizer pool.

    Text longer than ``max_context * max_token_chars`` characters cannot fit, and
    is refused before any tokenizing (as models/prompt.py does for messages).
    """
    if max_token_chars and len(text) > max_context * max_token_chars:
        raise bad_request(
            "context_length_exceeded",
            f"the prompt is {len(text)} characters, more than this model's context of "
            f"{max_context} tokens can hold (its longest token is {max_token_chars} characters)",
            "prompt",
        )
    ids = list(tokenizer(text)["input_ids"])
    if len(ids) >= max_context:
        raise bad_request(
            "context_length_exceeded",
            f"the prompt is {len(ids)} tokens; this model's context holds {max_context} "
            "(prompt and reply together)",
            "prompt",
        )
    return Prompt(ids, min(max_tokens, max_context - len(ids)))


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

    def check_logit_bias(self, params: RequestParams) -> None:
        """logit_bias names tokens of this model's vocabulary (the protocol cannot know it)."""
        tokenizer = self.engine.tokenizer
        if not params.logit_bias or tokenizer is None:
            return  # no tokenizer yet: admission answers not_ready
        vocab = len(tokenizer)
        unknown = [i for i, _ in params.logit_bias if i >= vocab]
        if unknown:
            raise bad_request(
                "invalid_parameter",
                f"'logit_bias' names token {unknown[0]}; this model's tokens are 0..{vocab - 1}",
                "logit_bias",
            )

    @asynccontextmanager
    async def completion(
        self, request: AnyCompletionRequest, limits: ClientLimits
    ) -> AsyncIterator[GenerationStream]:
        """One completion, start to end: rate limits (before any prompt work), start,
        and the stream's lifetime; leaving early cancels it, its tokens are charged."""
        await limits.admit()
        stream = await self.start(request)
        async with limits.metered(stream):
            yield stream

    async def start(self, request: AnyCompletionRequest) -> GenerationStream:
        """Check the model, build the prompt and start generating; the caller enters the stream.

        Raises model_not_found, ServerBusy (before the prompt is built), NotReady,
        context_length_exceeded.
        """
        self.check_model(request.model)
        self.check_logit_bias(request.params)
        forced = not isinstance(request, CompletionRequest) and request.tool_choice.forced
        param = "tool_choice" if forced else "response_format"
        await structured.check_grammar(self.engine, request.params, param)
        if isinstance(request, CompletionRequest):
            stream = await self.submit_text(request.prompt, request.params)
        else:
            stream = await self.engine.submit(
                request.messages, request.params, truncate=False, tools=request.prompt_tools
            )
        return self.inflight.add(stream)

    async def submit_text(self, text: str, params: RequestParams) -> GenerationStream:
        """engine.submit for raw text: admit, tokenize (no chat template) in the engine's
        tokenizer pool, start generating. Raises ServerBusy before any tokenizing,
        NotReady, context_length_exceeded."""
        engine = self.engine
        ticket = engine.admit()
        try:
            if engine.tokenizer is None:
                raise NotReady("the model is still loading")
            prompt = await engine.run_in_tokenizer_pool(
                text_prompt,
                engine.tokenizer,
                text,
                params.max_tokens or self.settings.default_max_tokens,
                engine.max_context,
                engine.max_token_chars,
            )
            return engine.generate(prompt, params, ticket)
        except BaseException:
            ticket.release()
            raise

    async def complete(
        self, request: AnyCompletionRequest, stream: GenerationStream
    ) -> dict[str, Any]:
        """Drain an entered stream into one ``chat.completion`` (or ``text_completion``)."""
        async for _ in stream:
            pass
        check_openai(stream)
        text = isinstance(request, CompletionRequest)
        reply: str | None = stream.text
        calls: list[ToolCall] = []
        parser = None if text else request.tool_parser()
        if parser is not None:
            reply, calls = parser.whole(stream.text)
        body = protocol.completion(
            text,
            protocol.text_completion_id() if text else protocol.completion_id(),
            int(time.time()),
            self.engine.model_id,
            reply,
            protocol.openai_finish_reason(stream.finish_reason, bool(calls)),
            usage_of(stream),
            calls,
        )
        return structured.attach_logprobs(body, stream, text)

    async def chunks(
        self, request: AnyCompletionRequest, stream: GenerationStream
    ) -> AsyncGenerator[dict[str, Any] | None, None]:
        """The chunks for an entered stream, in OpenAI's order: ``chat.completion.chunk``
        objects (a first one naming the role), or streamed ``text_completion`` objects
        for a text completion.

        None stands for a keep-alive: nothing to send for --keepalive-interval seconds.
        """
        text = isinstance(request, CompletionRequest)
        id = protocol.text_completion_id() if text else protocol.completion_id()
        created, model, usage = int(time.time()), self.engine.model_id, request.include_usage

        logprobs = structured.LogprobCursor(stream, text)

        def chunk(delta: str | dict[str, Any], reason: str | None = None) -> dict[str, Any]:
            return logprobs.attach(protocol.chunk(text, id, created, model, delta, reason, usage))

        # With tools, the reply is split into content and calls as it streams.
        parser = None if text else request.tool_parser()

        def parts(found: list[str | ToolCall]) -> list[dict[str, Any]]:
            deltas: list[dict[str, Any]] = []
            for part in found:
                if isinstance(part, str):
                    deltas.append({"content": part})
                else:
                    deltas += tool_call_deltas(parser.calls.index(part), part)
            return deltas

        if not text:
            yield chunk({"role": "assistant", "content": None if parser else ""})
        async for delta in stream.with_keepalive(self.settings.keepalive_interval):
            if delta is None:
                yield None
            elif parser is not None:
                for found in parts(parser.feed(delta)):
                    yield chunk(found)
            elif delta:
                yield chunk(delta if text else {"content": delta})
        check_openai(stream)
        if parser is not None:
            for found in parts(parser.close()):
                yield chunk(found)
        calls = parser is not None and bool(parser.calls)
        yield chunk("" if text else {}, protocol.openai_finish_reason(stream.finish_reason, calls))
        if usage:
            yield protocol.usage_chunk(text, id, created, model, usage_of(stream))
