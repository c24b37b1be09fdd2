"""One chat turn in a session, the same for /ws and /v1/query.

The prompt is the configured system prompt, the session's history and the new
user message, truncated by the engine (oldest turns first) to fit the
context. The turn is written to history only once its reply is over; see
``chatserver.sessions.base`` for what a cancelled or failed reply leaves.

``ChatService.turn`` owns a turn from start to end (rate limits, admission,
prompt, the generation, charging its tokens, storing it), so the transports,
/ws and /v1/query, only turn its text into frames or a response body.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from chatserver.config import Settings
from chatserver.errors import ApiError
from chatserver.limits import InFlight
from chatserver.models.prompt import check_chars
from chatserver.protocol.sampling import RequestParams
from chatserver.sessions import SessionStore, SessionStoreUnavailable
from chatserver.sessions.base import Message

if TYPE_CHECKING:
    from chatserver.api.ratelimit import ClientLimits
    from chatserver.engine.engine import GenerationStream, InferenceEngine

log = logging.getLogger(__name__)


def session_not_found(session_id: str) -> ApiError:
    return ApiError(404, "session_not_found", f"no session {session_id!r} (unknown or expired)")


@dataclass(slots=True)
class Turn:
    """A generation under way for one user message of one session."""

    session_id: str
    owner: str  # the caller's (chatserver.api.auth.Principal.owner)
    created: bool  # the session was made for this turn
    content: str
    stream: GenerationStream
    # Once the turn is over: whether it is in the session's history (False when
    # the session went away or the store could not be reached).
    stored: bool | None = None


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
        content: str,
        params: RequestParams,
        *,
        owner: str,
        limits: ClientLimits,
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
        """
        await limits.admit()
        # A message that could not fit even alone is refused before its session
        # is locked or read (a 1 MiB message costs a length check).
        check_chars(
            len(self.settings.system_prompt) + len(content),
            self.engine.max_context,
            self.engine.max_token_chars,
        )
        wait = self.settings.request_timeout or None
        async with AsyncExitStack() as held:
            if session_id is not None:
                await held.enter_async_context(self.sessions.turn_lock(session_id, wait))
            turn = await self.start_turn(session_id, content, params, owner=owner)
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
        self, session_id: str | None, content: str, params: RequestParams, *, owner: str
    ) -> Turn:
        """Build the prompt and start generating; None as session_id starts a session of owner's.

        Raises session_not_found (also for another owner's session), ServerBusy
        (before the prompt is built), NotReady, context_length_exceeded.
        """
        history: list[Message] = []
        if session_id is not None:
            found = await self.sessions.messages(session_id, owner=owner)
            if found is None:
                raise session_not_found(session_id)
            history = found
        messages = [{"role": "system", "content": self.settings.system_prompt}]
        messages += [{"role": m["role"], "content": m["content"]} for m in history]
        messages.append({"role": "user", "content": content})
        stream = self.inflight.add(await self.engine.submit(messages, params, truncate=True))
        created = session_id is None
        if session_id is None:
            try:
                session_id = await self.sessions.create(owner=owner)
            except BaseException:
                stream.cancel()
                raise
        return Turn(session_id, owner, created, content, stream)

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
        assistant: Message = {"role": "assistant", "content": turn.stream.text}
        if reason in ("cancelled", "interrupted"):
            assistant[reason] = True  # the history shows what the user saw: a cut reply
        user: Message = {"role": "user", "content": turn.content}
        try:
            stored = await self.sessions.append_turn(
                turn.session_id, user, assistant, owner=turn.owner
            )
        except SessionStoreUnavailable as exc:
            log.warning("session %s: reply delivered but not stored: %s", turn.session_id, exc)
            return False
        if not stored:
            log.info("session %s went away before its reply was stored", turn.session_id)
        return stored
