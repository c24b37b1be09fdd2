"""Responses on the engine: each turn's prompt, its stream of events, its stored record.

A response's prompt is its ``instructions`` (a system message), the stored
conversation of its ``previous_response_id`` and its own input, rendered by the
chat template (engine.chat_prompt). A chain renders the same messages, in the
same order, every turn, so each turn's prompt starts with the previous turn's
prompt and reply and the worker's KV prefix cache reuses them
(``usage.input_tokens_details.cached_tokens`` says how many). ``instructions``
are not inherited along a chain (OpenAI's rule): send the same ones every turn
to keep the prefix.

Status, once a response ends: ``completed`` (the model stopped), ``incomplete``
(``max_output_tokens`` reached), ``cancelled`` (``POST .../cancel``, or its
client went away) or ``failed`` (the generation failed; ``error`` says why). A
stored response (``store``, the default) is kept in the session store
(sessions/responses.py) with its conversation, whatever its status;
``store: false`` responses are never retrievable, but WebSocket mode keeps a
socket's latest ones so that its next ``response.create`` may chain from them.

Cancel: a response generating on this server, background or not (a stream, a
WebSocket turn), stops at once and ends ``cancelled`` with the text it had; the
call answers the response as it ended. A finished response is answered as it
is (cancelling twice changes nothing). A background response running on
another server sharing the Redis cannot be reached from here: 409
``response_not_cancellable``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from chatserver.api.errors import to_api_error
from chatserver.api.openai import structured
from chatserver.api.openai.serving import OpenAIServing, check_openai
from chatserver.api.responses import protocol
from chatserver.api.responses.protocol import CreateRequest, OutputBuilder
from chatserver.config import Settings
from chatserver.errors import ApiError, bad_request
from chatserver.limits import InFlight
from chatserver.sessions.base import Message
from chatserver.sessions.responses import ResponseStore, StoredResponse

if TYPE_CHECKING:
    from chatserver.api.ratelimit import ClientLimits
    from chatserver.engine.engine import GenerationStream, InferenceEngine

log = logging.getLogger(__name__)

# How long POST .../cancel waits for a cancelled generation to wind down.
CANCEL_WAIT_S = 5.0


def previous_not_found(response_id: str) -> ApiError:
    return ApiError(
        400,
        "previous_response_not_found",
        f"Previous response with id '{response_id}' not found.",
        "previous_response_id",
    )


def response_not_found(response_id: str) -> ApiError:
    return ApiError(404, "not_found", f"Response with id '{response_id}' not found.", "id")


@dataclass(slots=True)
class ResponseRun:
    """One response from its start to its stored end: request, stream, what it became."""

    request: CreateRequest
    id: str
    owner: str
    created_at: float
    model: str
    # The conversation before this response's output: the previous one's and this input.
    history: list[Message]
    stream: GenerationStream
    temperature: float
    top_p: float
    output: OutputBuilder
    seq: int = 0
    fed: int = 0  # characters of the reply given to ``output``
    fed_logprobs: int = 0  # entries of ``stream.logprobs`` given to ``output``
    closed: bool = False  # ``output`` has its end
    final: dict[str, Any] | None = None  # the response object once it ended
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def snapshot(self, status: str, **extra: Any) -> dict[str, Any]:
        return protocol.response_object(
            self.request,
            self.id,
            self.created_at,
            self.model,
            status,
            temperature=self.temperature,
            top_p=self.top_p,
            **extra,
        )

    def numbered(self, event: dict[str, Any]) -> dict[str, Any]:
        """The event with the next ``sequence_number`` (from 0, per response)."""
        event["sequence_number"] = self.seq
        self.seq += 1
        return event

    def feed(self, delta: str) -> list[dict[str, Any]]:
        """The output events for a delta of the reply, with the logprobs of the tokens
        delivered since the last (structured.LogprobCursor's rule, as chat streams them)."""
        self.fed += len(delta)
        entries = self.stream.logprobs
        if entries is None:
            return self.output.feed(delta)
        new = [structured.chat_entry(e) for e in entries[self.fed_logprobs :]]
        self.fed_logprobs = len(entries)
        return self.output.feed(delta, new)

    def outcome(self) -> tuple[str, dict[str, Any] | None]:
        """How the ended stream ended: the response's status, and its error if failed."""
        stream = self.stream
        try:
            check_openai(stream)
        except Exception as exc:
            err = to_api_error(exc)
            return "failed", protocol.error_object(err.code, err.message)
        status = {"stop": "completed", "length": "incomplete"}.get(stream.finish_reason or "")
        return status or "cancelled", None

    def end(self) -> list[dict[str, Any]]:
        """The output's last events (once): the reply's rest, the open item's end."""
        if self.closed:
            return []
        self.closed = True
        rest = self.fed < len(self.stream.text) or (
            self.stream.logprobs is not None and self.fed_logprobs < len(self.stream.logprobs)
        )
        events = self.feed(self.stream.text[self.fed :]) if rest else []
        status, _ = self.outcome()
        return events + self.output.close("completed" if status == "completed" else "incomplete")

    def ended(self, usage: dict[str, Any]) -> dict[str, Any]:
        """The response object of the ended run, however it ended."""
        self.end()
        status, error = self.outcome()
        if status == "failed":
            return self.snapshot(status, error=error, usage=usage)
        return self.snapshot(
            status,
            output=self.output.items,
            usage=usage,
            incomplete_reason="max_output_tokens" if status == "incomplete" else None,
        )


class ResponsesServing:
    def __init__(
        self,
        engine: InferenceEngine,
        store: ResponseStore,
        settings: Settings,
        inflight: InFlight,
        openai: OpenAIServing,
    ) -> None:
        self.engine = engine
        self.store = store
        self.settings = settings
        self.inflight = inflight
        self.openai = openai
        # Responses generating in this process, by id: what cancel can reach.
        self._running: dict[str, ResponseRun] = {}
        self._background: set[asyncio.Task[None]] = set()

    # --- a response's life ---------------------------------------------------
    async def _previous(
        self, request: CreateRequest, owner: str, local: Mapping[str, StoredResponse] | None
    ) -> list[Message]:
        """The conversation the request continues: its previous response's, or none."""
        previous_id = request.previous_response_id
        if previous_id is None:
            return []
        record = local.get(previous_id) if local is not None else None
        if record is None:
            record = await self.store.get(previous_id, owner=owner)
        if record is None:
            raise previous_not_found(previous_id)
        if record.response.get("status") in ("queued", "in_progress"):
            raise bad_request(
                "invalid_field",
                f"the previous response {previous_id!r} is still in progress",
                "previous_response_id",
            )
        return record.history

    @asynccontextmanager
    async def run(
        self,
        request: CreateRequest,
        owner: str,
        limits: ClientLimits,
        local: dict[str, StoredResponse] | None = None,
    ) -> AsyncIterator[ResponseRun]:
        """One response, start to stored end: model check, conversation, rate limits,
        generation; leaving early cancels it. ``local``: a WebSocket's own latest
        responses, looked up before the store and given each new one.

        Raises model_not_found, previous_response_not_found, RateLimited,
        ServerBusy, NotReady, context_length_exceeded before anything is generated.
        """
        self.openai.check_model(request.model)
        history = await self._previous(request, owner, local) + protocol.to_messages(request.items)
        messages = history
        if request.instructions:
            messages = [{"role": "system", "content": request.instructions}, *history]
        forced = request.tool_choice.forced
        await structured.check_grammar(
            self.engine, request.params, "tool_choice" if forced else "text.format"
        )
        await limits.admit()
        stream = await self.engine.submit(
            messages,
            request.params,
            truncate=request.truncation == "auto",
            tools=request.prompt_tools,
        )
        self.inflight.add(stream)
        engine = self.engine
        p = request.params
        run = ResponseRun(
            request,
            protocol.response_id(),
            owner,
            time.time(),
            engine.model_id,
            history,
            stream,
            temperature=engine.default_temperature if p.temperature is None else p.temperature,
            top_p=engine.default_top_p if p.top_p is None else p.top_p,
            output=request.output(),
        )
        self._running[run.id] = run
        try:
            async with limits.metered(stream):
                yield run
        finally:
            del self._running[run.id]
            await self._finish(run, local)

    def _usage(self, stream: GenerationStream) -> dict[str, Any]:
        return protocol.usage(stream.prompt_tokens, stream.completion_tokens, stream.cached_tokens)

    async def _finish(self, run: ResponseRun, local: dict[str, StoredResponse] | None) -> None:
        """Record how the run ended; store it (and hand it to ``local``) with its conversation."""
        if not run.stream.finished:
            run.stream.cancel()
        run.final = run.ended(self._usage(run.stream))
        history = run.history
        if run.final["status"] != "failed":
            history = [*history, *protocol.output_messages(run.output.items)]
        record = StoredResponse(run.id, run.owner, run.final, history, run.request.input_items)
        if local is not None:
            local[run.id] = record
        if run.request.store:
            try:
                await self.store.put(record)
            except Exception as exc:  # the reply was delivered; only its record is lost
                log.warning("could not store response %s: %s", run.id, exc)
        run.done.set()

    # --- transports' views of a run ------------------------------------------
    async def complete(self, run: ResponseRun) -> dict[str, Any]:
        """Drain a run into its response object; a generation that failed raises."""
        async for _ in run.stream:
            pass
        check_openai(run.stream)
        return run.ended(self._usage(run.stream))

    async def events(self, run: ResponseRun) -> AsyncGenerator[dict[str, Any] | None, None]:
        """The run's stream events in OpenAI's order, numbered; None: a keep-alive is due.

        ``response.created``, ``response.in_progress``, then each output item's
        (a message: added, its text part added, ``response.output_text.delta``s,
        text, part and item done; a function call: added, its arguments, done),
        then ``response.completed`` (or ``response.incomplete`` for
        max_output_tokens and cancelled ones, ``response.failed`` when the
        generation failed: its ``response.error`` says why).
        """
        yield run.numbered(protocol.event("response.created", response=run.snapshot("in_progress")))
        yield run.numbered(
            protocol.event("response.in_progress", response=run.snapshot("in_progress"))
        )
        for event in run.output.start():
            yield run.numbered(event)
        async for delta in run.stream.with_keepalive(self.settings.keepalive_interval):
            if delta is None:
                yield None
            elif delta:
                for event in run.feed(delta):
                    yield run.numbered(event)
        status, _ = run.outcome()
        if status != "failed":
            for event in run.end():
                yield run.numbered(event)
        final = run.ended(self._usage(run.stream))
        kind = {"completed": "response.completed", "failed": "response.failed"}.get(
            status, "response.incomplete"
        )
        yield run.numbered(protocol.event(kind, response=final))

    # --- background ------------------------------------------------------------
    async def start_background(
        self, request: CreateRequest, owner: str, limits: ClientLimits
    ) -> dict[str, Any]:
        """Start a response that runs on without its client: answered at once
        (``queued`` until a worker takes it), stored when it ends; GET polls it."""
        started: asyncio.Future[ResponseRun] = asyncio.get_running_loop().create_future()

        async def generate() -> None:
            try:
                async with self.run(request, owner, limits) as run:
                    queued = StoredResponse(
                        run.id, owner, run.snapshot("queued"), input_items=request.input_items
                    )
                    await self.store.put(queued)
                    started.set_result(run)
                    async for _ in run.stream:
                        pass
            except BaseException as exc:
                if not started.done():
                    started.set_exception(exc)
                elif not isinstance(exc, asyncio.CancelledError):
                    log.error("background response failed", exc_info=exc)

        task = asyncio.create_task(generate())
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        run = await started
        return run.snapshot("queued")

    # --- stored responses -------------------------------------------------------
    async def retrieve(self, response_id: str, owner: str) -> dict[str, Any]:
        record = await self.store.get(response_id, owner=owner)
        if record is None:
            raise response_not_found(response_id)
        running = self._running.get(response_id)
        if running is not None and running.owner == owner and running.stream.scheduled:
            return running.snapshot("in_progress", output=running.output.open_items)
        return record.response

    async def input_items(
        self, response_id: str, owner: str, query: protocol.ItemsQuery
    ) -> dict[str, Any]:
        """A page of a stored response's input items (any server on the store's Redis)."""
        record = await self.store.get(response_id, owner=owner)
        if record is None:
            raise response_not_found(response_id)
        return protocol.items_page(record.input_items, query)

    async def delete(self, response_id: str, owner: str) -> dict[str, Any]:
        if not await self.store.delete(response_id, owner=owner):
            raise response_not_found(response_id)
        return protocol.deleted(response_id)

    async def cancel(self, response_id: str, owner: str) -> dict[str, Any]:
        """Stop a response generating here; a finished one is answered unchanged."""
        run = self._running.get(response_id)
        if run is not None and run.owner == owner:
            run.stream.cancel()
            try:
                async with asyncio.timeout(CANCEL_WAIT_S):
                    await run.done.wait()
            except TimeoutError:
                pass
            return run.final or run.snapshot("cancelled")
        record = await self.store.get(response_id, owner=owner)
        if record is None:
            raise response_not_found(response_id)
        if record.response.get("status") in ("queued", "in_progress"):
            raise ApiError(
                409,
                "response_not_cancellable",
                f"response {response_id!r} is running on another server of this deployment",
                "id",
            )
        return record.response

    async def close(self) -> None:
        """Let background responses record how they ended (the engine interrupts them)."""
        if self._background:
            await asyncio.wait(self._background, timeout=CANCEL_WAIT_S)
