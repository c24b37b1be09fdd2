"""Chat and text completions on the engine: the prompt is exactly the client's.

Chat completions render the client's messages through the chat template; text
completions (legacy ``/v1/completions``) tokenize the client's text as it is.
Stateless (no session store) and never truncated: a prompt that does not fit
the context is the client's to shorten, so it gets 400
``context_length_exceeded`` rather than a silently edited prompt. A request's
``n`` choices are ``n`` generations of its one prompt (choices.py).
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import aclosing, asynccontextmanager
from typing import TYPE_CHECKING, Any

from chatserver.api.openai import choices, protocol, structured
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
from chatserver.models.tools import ToolCall, ToolCallParser
from chatserver.protocol.sampling import RequestParams

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
    ) -> AsyncIterator[Sequence[GenerationStream]]:
        """One completion, start to end: rate limits (before any prompt work), start its
        ``n`` generations, and their lifetime; leaving early cancels those still
        running, their tokens are charged."""
        await limits.admit()
        streams = await self.start(request)
        async with limits.metered_all(streams):
            yield streams

    async def start(self, request: AnyCompletionRequest) -> list[GenerationStream]:
        """Check the model, build the prompt and start generating the request's ``n``
        choices; the caller enters the streams.

        Raises model_not_found, ServerBusy (before the prompt is built, when the
        ``n`` generations do not all fit), NotReady, context_length_exceeded.
        """
        self.check_model(request.model)
        self.check_logit_bias(request.params)
        self.check_n(request.n)
        forced = not isinstance(request, CompletionRequest) and request.tool_choice.forced
        param = "tool_choice" if forced else "response_format"
        await structured.check_grammar(self.engine, request.params, param)
        params = choices.choice_params(request.params, request.n)
        if isinstance(request, CompletionRequest):
            streams = await self.submit_text(request.prompt, params)
        else:
            streams = await self.engine.submit_many(
                request.messages, params, truncate=False, tools=request.prompt_tools
            )
        return [self.inflight.add(stream) for stream in streams]

    def check_n(self, n: int) -> None:
        """400 for more choices than this server ever admits at once (a 503 would
        promise that a retry can succeed)."""
        capacity = self.engine.capacity
        if 0 < capacity < n:
            raise bad_request(
                "invalid_parameter",
                f"'n' is {n}; this server runs or queues at most {capacity} generations at once",
                "n",
            )

    async def submit_text(
        self, text: str, params: Sequence[RequestParams]
    ) -> list[GenerationStream]:
        """engine.submit_many for raw text: admit, tokenize (no chat template) in the
        engine's tokenizer pool, start generating. Raises ServerBusy before any
        tokenizing, NotReady, context_length_exceeded."""
        engine = self.engine
        tickets = engine.admit_many(len(params))
        try:
            if engine.tokenizer is None:
                raise NotReady("the model is still loading")
            prompt = await engine.run_in_tokenizer_pool(
                text_prompt,
                engine.tokenizer,
                text,
                params[0].max_tokens or self.settings.default_max_tokens,
                engine.max_context,
                engine.max_token_chars,
            )
            return engine.generate_many(prompt, params, tickets)
        except BaseException:
            for ticket in tickets:
                ticket.release()
            raise

    async def complete(
        self, request: AnyCompletionRequest, streams: Sequence[GenerationStream]
    ) -> dict[str, Any]:
        """Drain entered streams into one ``chat.completion`` (or ``text_completion``),
        a choice each; the first that fails fails the whole."""
        await choices.drain(streams, check_openai)
        text = isinstance(request, CompletionRequest)
        return protocol.completion(
            text,
            protocol.text_completion_id() if text else protocol.completion_id(),
            int(time.time()),
            self.engine.model_id,
            [self._choice(request, i, stream) for i, stream in enumerate(streams)],
            choices.usage(streams),
        )

    def _choice(
        self, request: AnyCompletionRequest, index: int, stream: GenerationStream
    ) -> dict[str, Any]:
        text = isinstance(request, CompletionRequest)
        reply: str | None = stream.text
        calls: list[ToolCall] = []
        parser = None if text else request.tool_parser()
        if parser is not None:
            reply, calls = parser.whole(stream.text)
        reason = protocol.openai_finish_reason(stream.finish_reason, bool(calls))
        body = protocol.choice(text, index, reply, reason, calls)
        return structured.attach_logprobs(body, stream, text)

    async def chunks(
        self, request: AnyCompletionRequest, streams: Sequence[GenerationStream]
    ) -> AsyncGenerator[dict[str, Any] | None, None]:
        """The chunks for entered streams, in OpenAI's order: ``chat.completion.chunk``
        objects (a first one per choice naming the role), or streamed
        ``text_completion`` objects for a text completion. Each chunk carries one
        choice's ``index``; each choice ends with its own ``finish_reason`` chunk,
        as it ends; the usage (of all) comes once all have.

        None stands for a keep-alive: nothing to send for --keepalive-interval seconds.
        """
        text = isinstance(request, CompletionRequest)
        id = protocol.text_completion_id() if text else protocol.completion_id()
        created, model, usage = int(time.time()), self.engine.model_id, request.include_usage
        each = [
            _ChoiceDeltas(i, stream, text, None if text else request.tool_parser())
            for i, stream in enumerate(streams)
        ]

        def chunk(
            c: _ChoiceDeltas, delta: str | dict[str, Any], reason: str | None = None
        ) -> dict[str, Any]:
            body = protocol.chunk(text, id, created, model, delta, reason, usage, c.index)
            return c.logprobs.attach(body)

        if not text:
            for c in each:
                yield chunk(c, {"role": "assistant", "content": None if c.parser else ""})
        keepalive = self.settings.keepalive_interval
        async with aclosing(choices.merged(streams, keepalive)) as items:
            async for item in items:
                if item is None:
                    yield None
                    continue
                index, delta = item
                c = each[index]
                if delta is not None:
                    for found in c.feed(delta):
                        yield chunk(c, found)
                    continue
                check_openai(c.stream)
                for found in c.close():
                    yield chunk(c, found)
                yield chunk(c, "" if text else {}, c.finish_reason())
        if usage:
            yield protocol.usage_chunk(text, id, created, model, choices.usage(streams))


class _ChoiceDeltas:
    """One streamed choice's deltas: with tools, its reply is split into content and
    calls as it streams; its logprob entries go with the chunks that carry its text."""

    def __init__(
        self, index: int, stream: GenerationStream, text: bool, parser: ToolCallParser | None
    ) -> None:
        self.index = index
        self.stream = stream
        self.text = text
        self.parser = parser
        self.logprobs = structured.LogprobCursor(stream, text)

    def _parts(self, found: list[str | ToolCall]) -> list[dict[str, Any]]:
        assert self.parser is not None
        deltas: list[dict[str, Any]] = []
        for part in found:
            if isinstance(part, str):
                deltas.append({"content": part})
            else:
                deltas += tool_call_deltas(self.parser.calls.index(part), part)
        return deltas

    def feed(self, delta: str) -> list[str | dict[str, Any]]:
        if self.parser is not None:
            return self._parts(self.parser.feed(delta))
        return [delta if self.text else {"content": delta}]

    def close(self) -> list[dict[str, Any]]:
        return [] if self.parser is None else self._parts(self.parser.close())

    def finish_reason(self) -> str:
        calls = self.parser is not None and bool(self.parser.calls)
        return protocol.openai_finish_reason(self.stream.finish_reason, calls)
