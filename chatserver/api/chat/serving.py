"""One chat turn in a session, the same for /ws and /v1/query.

The prompt is the configured system prompt, the session's history and the new
user message, truncated by the engine (oldest turns first) to fit the
context. The turn is written to history only once its reply is over; see
``chatserver.sessions.base`` for what a cancelled or failed reply leaves.

``ChatService.turn`` owns a turn from start to end (rate limits, admission,
prompt, the generation, charging its tokens, storing it), so the transports,
/ws and /v1/query, only turn its text into frames or a response body.

Tools (/ws): a turn may list tools (``ToolUse``); its reply is then split into
content and calls (``Turn.split``), and an assistant message with calls is
stored with them, and with the tools it had, so the calls stay answerable
from any socket. A continuation is a turn whose opening is the calls' results
(``ToolAnswers``) instead of a user message: it runs only while those calls
are the session's last message (else ``tool_calls_abandoned``), and stores the
tool messages and its reply together, as a turn stores the user message and
its reply.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from chatserver.config import Settings
from chatserver.engine.errors import InvalidGrammar
from chatserver.errors import ApiError, bad_request
from chatserver.limits import InFlight
from chatserver.models.prompt import check_chars
from chatserver.models.tools import ToolCall, ToolCallParser, ToolChoice, ToolUse, parse_tools
from chatserver.protocol.sampling import RequestParams
from chatserver.sessions import SessionStore, SessionStoreUnavailable
from chatserver.sessions.base import Message

if TYPE_CHECKING:
    from chatserver.api.ratelimit import ClientLimits
    from chatserver.engine.engine import GenerationStream, InferenceEngine

log = logging.getLogger(__name__)


NO_TOOLS = ToolUse()


def session_not_found(session_id: str) -> ApiError:
    return ApiError(404, "session_not_found", f"no session {session_id!r} (unknown or expired)")


def tool_calls_abandoned(session_id: str) -> ApiError:
    return ApiError(
        409,
        "tool_calls_abandoned",
        f"the tool calls answered are no longer the last message of session {session_id!r}: "
        "the session went on without their results",
    )


@dataclass(frozen=True, slots=True)
class ToolAnswers:
    """A continuation's opening: the results of every call of the session's last reply."""

    call_ids: tuple[str, ...]  # the calls answered, in the reply's order
    contents: tuple[str, ...]  # their results, in the same order

    def messages(self) -> list[Message]:
        return [
            {"role": "tool", "tool_call_id": call_id, "content": content}
            for call_id, content in zip(self.call_ids, self.contents, strict=True)
        ]


@dataclass(frozen=True, slots=True)
class PendingCalls:
    """The calls of a session's last message, unanswered, and the tools a
    continuation lists: the turn's, with ``tool_choice: "auto"`` (forcing a
    call again would loop)."""

    call_ids: tuple[str, ...]
    tools: ToolUse


def pending_calls(history: list[Message]) -> PendingCalls | None:
    """The unanswered calls that end a history, from the assistant message stored with them."""
    if not history or history[-1].get("role") != "assistant":
        return None
    last = history[-1]
    calls = last.get("tool_calls") or ()
    if not calls:
        return None
    try:
        tools = parse_tools({"tools": last.get("tools") or []})
    except ApiError:  # stored by this server: only a hand-edited store gets here
        tools = ()
    parallel = last.get("parallel_tool_calls") is not False
    choice = ToolChoice("auto" if tools else "none")
    return PendingCalls(tuple(c["id"] for c in calls), ToolUse(tools, choice, parallel))


def _prompt_message(message: Message) -> dict[str, Any]:
    """A stored message as the prompt takes it: its role, text and tool fields."""
    out: dict[str, Any] = {"role": message["role"], "content": message.get("content") or ""}
    for key in ("tool_calls", "tool_call_id"):
        if message.get(key):
            out[key] = message[key]
    return out


@dataclass(slots=True)
class Turn:
    """A generation under way for one user message (or tool results) of one session."""

    session_id: str
    owner: str  # the caller's (chatserver.api.auth.Principal.owner)
    created: bool  # the session was made for this turn
    opening: list[Message]  # what the reply answers: a user message, or tool results
    stream: GenerationStream
    tools: ToolUse = NO_TOOLS
    # Once the turn is over: whether it is in the session's history (False when
    # the session went away or the store could not be reached).
    stored: bool | None = None
    parser: ToolCallParser | None = field(default=None, init=False)
    _content: list[str] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        self.parser = self.tools.parser()

    @property
    def content(self) -> str:
        """The user message's text ("" for a continuation)."""
        first = self.opening[0]
        return first["content"] if first["role"] == "user" else ""

    def split(self, delta: str) -> list[str | ToolCall]:
        """Reply text as it comes, as what the client may see: content and tool calls.

        Without tools, the text itself; with tools, text that may start a call
        is held back until the next text decides (models/tools.ToolCallParser).
        """
        if self.parser is None:
            return [delta] if delta else []
        return self._seen(self.parser.feed(delta))

    def split_end(self) -> list[str | ToolCall]:
        """What ``split`` held back, once the stream has ended."""
        return [] if self.parser is None else self._seen(self.parser.close())

    def _seen(self, parts: list[str | ToolCall]) -> list[str | ToolCall]:
        self._content += [p for p in parts if isinstance(p, str)]
        return parts

    @property
    def calls(self) -> list[ToolCall]:
        """The reply's tool calls; none when it was cut short by a cancel or a shutdown."""
        if self.parser is None or self.stream.finish_reason not in ("stop", "length"):
            return []
        return self.parser.calls

    def pending(self) -> PendingCalls | None:
        """The reply's calls, to be answered; None when it made none."""
        calls = self.calls
        if not calls:
            return None
        tools = ToolUse(self.tools.tools, ToolChoice("auto"), self.tools.parallel)
        return PendingCalls(tuple(c.id for c in calls), tools)

    @property
    def finish_reason(self) -> str:
        """The stream's, or "tool_calls" when the reply made calls (cut or not)."""
        return "tool_calls" if self.calls else (self.stream.finish_reason or "stop")

    @property
    def reply_text(self) -> str:
        """The reply as the client saw it: without tools, all of it; with, its content."""
        return self.stream.text if self.parser is None else "".join(self._content)


class ChatService:
    def __init__(
        self,
        engine: InferenceEngine,
        sessions: SessionStore,
        settings: Settings,
        inflight: InFlight,
    ) -> None:
        self.engine = engine
        self.sessions = sessions
        self.settings = settings
        self.inflight = inflight

    @asynccontextmanager
    async def turn(
        self,
        session_id: str | None,
        content: str | ToolAnswers,
        params: RequestParams,
        *,
        owner: str,
        limits: ClientLimits,
        tools: ToolUse = NO_TOOLS,
    ) -> AsyncIterator[Turn]:
        """One turn, start to end; the caller only reads ``turn.stream``'s text.

        Entering: the client's rate limits (before any session or prompt work),
        a message too long to fit even alone refused (context_length_exceeded),
        then the session's turn lock (SessionBusy past --request-timeout), then
        start_turn. Leaving early (an error, the client gone) cancels the
        generation; its tokens are charged either way. Leaving normally: a
        reply that failed raises its error (GenerationFailed, RequestTimedOut)
        and is not stored; a reply (a cancelled one with its partial text) is
        stored, and ``turn.stored`` says whether that worked: a store that
        cannot be reached does not take a delivered reply away from its client.
        The lock is held until the turn is stored.

        ``content`` is the user's message, or the results of the session's
        pending tool calls (a continuation: ``session_id`` is required, and
        tool_calls_abandoned is raised when they are not its last message).
        ``tools``: what the model may call; a forced choice's grammar is in
        ``params`` and is checked here (a schema that does not compile is an
        invalid_field on ``tools``).
        """
        await limits.admit()
        # A message that could not fit even alone is refused before its session
        # is locked or read (a 1 MiB message costs a length check).
        opening = (
            content.messages()
            if isinstance(content, ToolAnswers)
            else [{"role": "user", "content": content}]
        )
        check_chars(
            len(self.settings.system_prompt) + sum(len(m["content"]) for m in opening),
            self.engine.max_context,
            self.engine.max_token_chars,
        )
        if params.grammar is not None:
            try:
                await self.engine.check_grammar(params.grammar)
            except InvalidGrammar as exc:
                raise bad_request("invalid_field", f"tools: {exc}", "tools") from None
        wait = self.settings.request_timeout or None
        async with AsyncExitStack() as held:
            if session_id is not None:
                await held.enter_async_context(self.sessions.turn_lock(session_id, wait))
            turn = await self.start_turn(session_id, opening, params, owner=owner, tools=tools)
            if turn.created:
                # Nobody knows the new id yet, so this does not wait; a client
                # that learns it from this turn queues behind it.
                try:
                    await held.enter_async_context(self.sessions.turn_lock(turn.session_id, wait))
                except BaseException:
                    turn.stream.cancel()
                    raise
            async with limits.metered(turn.stream):
                yield turn
            turn.stream.check()
            turn.stored = await self.finish_turn(turn)

    async def start_turn(
        self,
        session_id: str | None,
        opening: list[Message],
        params: RequestParams,
        *,
        owner: str,
        tools: ToolUse = NO_TOOLS,
    ) -> Turn:
        """Build the prompt and start generating; None as session_id starts a session of owner's.

        ``opening``: the user message, or the tool messages of a continuation.
        Raises session_not_found (also for another owner's session),
        tool_calls_abandoned, ServerBusy (before the prompt is built), NotReady,
        context_length_exceeded.
        """
        history: list[Message] = []
        if session_id is not None:
            found = await self.sessions.messages(session_id, owner=owner)
            if found is None:
                raise session_not_found(session_id)
            history = found
        if opening[0]["role"] == "tool":
            pending = pending_calls(history)
            answered = tuple(m["tool_call_id"] for m in opening)
            if session_id is None or pending is None or pending.call_ids != answered:
                raise tool_calls_abandoned(session_id or "")
        # A history cap may have cut a tool exchange: the prompt starts at a user message.
        start = next((i for i, m in enumerate(history) if m["role"] == "user"), len(history))
        messages = [{"role": "system", "content": self.settings.system_prompt}]
        messages += [_prompt_message(m) for m in history[start:]]
        messages += opening
        submitted = await self.engine.submit(
            messages, params, truncate=True, tools=tools.prompt_tools
        )
        stream = self.inflight.add(submitted)
        created = session_id is None
        if session_id is None:
            try:
                session_id = await self.sessions.create(owner=owner)
            except BaseException:
                stream.cancel()
                raise
        return Turn(session_id, owner, created, opening, stream, tools)

    async def finish_turn(self, turn: Turn) -> bool:
        """Store the finished turn (a cancelled one with its partial text; a failed one not).

        True once stored; False when it was not (failed, cut off before its
        first token, session gone, store down).
        """
        reason = turn.stream.finish_reason
        if reason not in ("stop", "length", "cancelled", "interrupted"):
            return False
        if reason in ("cancelled", "interrupted") and not turn.stream.completion_tokens:
            return False  # it never started: nothing was said, nothing to remember
        assistant: Message = {"role": "assistant", "content": turn.reply_text}
        if reason in ("cancelled", "interrupted"):
            assistant[reason] = True  # the history shows what the user saw: a cut reply
        if turn.calls:
            # With the tools they chose from, so a continuation can list them
            # again, from any socket (pending_calls).
            assistant["tool_calls"] = [
                {"id": c.id, "name": c.name, "arguments": c.arguments} for c in turn.calls
            ]
            assistant["tools"] = [t.definition() for t in turn.tools.tools]
            assistant["parallel_tool_calls"] = turn.tools.parallel
        try:
            stored = await self.sessions.append_turn(
                turn.session_id, turn.opening, assistant, owner=turn.owner
            )
        except SessionStoreUnavailable as exc:
            log.warning("session %s: reply delivered but not stored: %s", turn.session_id, exc)
            return False
        if not stored:
            log.info("session %s went away before its reply was stored", turn.session_id)
        return stored
