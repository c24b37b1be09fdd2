"""The embedded session store: a dict in this process, the default without Redis.

Sessions live as long as the process (and ``ttl`` seconds after their last
use). Every method runs without awaiting, so each is atomic on the event loop.
Expired sessions are dropped lazily: sessions are kept in least-recently-used
order, so each call pops the expired ones from the front in amortised O(1).
Each owner's session ids are indexed too, so a listing reads only the caller's.
Turns are serialized with one asyncio lock per session (``TurnLocks``).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from chatserver.sessions.base import (
    Message,
    SessionInfo,
    SessionPage,
    SessionStore,
    TurnLocks,
    after_cursor,
    decode_cursor,
    encode_cursor,
    kept_under_cap,
    new_session_id,
    turn_messages,
    valid_session_id,
)


@dataclass(slots=True)
class _Session:
    owner: str
    created: int  # unix seconds
    last_used: float  # the store's clock, for expiry
    last_used_at: float  # unix seconds, for listings
    messages: list[Message] = field(default_factory=list)


class MemorySessionStore(SessionStore):
    def __init__(
        self, ttl: float, clock: Callable[[], float] = time.monotonic, max_messages: int = 0
    ) -> None:
        super().__init__(ttl, max_messages)
        self._clock = clock
        self._turns = TurnLocks()
        # session id -> session, least recently used first
        self._sessions: OrderedDict[str, _Session] = OrderedDict()
        self._by_owner: dict[str, set[str]] = {}

    def _forget(self, session_id: str) -> _Session | None:
        session = self._sessions.pop(session_id, None)
        if session is not None:
            ids = self._by_owner[session.owner]
            ids.discard(session_id)
            if not ids:
                del self._by_owner[session.owner]
        return session

    def _expire(self) -> None:
        deadline = self._clock() - self.ttl
        while self._sessions:
            session_id, session = next(iter(self._sessions.items()))
            if session.last_used > deadline:
                break
            self._forget(session_id)

    def _touch(self, session_id: str, owner: str) -> _Session | None:
        self._expire()
        if not valid_session_id(session_id):
            return None
        session = self._sessions.get(session_id)
        if session is None or session.owner != owner:
            return None
        session.last_used = self._clock()
        session.last_used_at = time.time()
        self._sessions.move_to_end(session_id)
        return session

    def __len__(self) -> int:
        self._expire()
        return len(self._sessions)

    async def check(self) -> None:
        return None

    async def create(self, *, owner: str) -> str:
        self._expire()
        session_id = new_session_id()
        now = time.time()
        self._sessions[session_id] = _Session(owner, int(now), self._clock(), now)
        self._by_owner.setdefault(owner, set()).add(session_id)
        return session_id

    async def exists(self, session_id: str, *, owner: str) -> bool:
        return self._touch(session_id, owner) is not None

    async def messages(self, session_id: str, *, owner: str) -> list[Message] | None:
        session = self._touch(session_id, owner)
        return None if session is None else [dict(m) for m in session.messages]

    async def append_turn(
        self, session_id: str, user: Message | list[Message], assistant: Message, *, owner: str
    ) -> bool:
        session = self._touch(session_id, owner)
        if session is None:
            return False
        session.messages.extend(turn_messages(user, assistant))
        keep = kept_under_cap(len(session.messages), self.max_messages)
        del session.messages[: len(session.messages) - keep]
        return True

    @asynccontextmanager
    async def turn_lock(self, session_id: str, wait: float | None) -> AsyncIterator[None]:
        if not valid_session_id(session_id):
            yield
            return
        async with self._turns.hold(session_id, wait):
            yield

    async def delete(self, session_id: str, *, owner: str) -> bool:
        self._expire()
        session = self._sessions.get(session_id)
        if session is None or session.owner != owner:
            return False
        self._forget(session_id)
        return True

    async def list_sessions(
        self, *, owner: str, limit: int, cursor: str | None = None
    ) -> SessionPage:
        after = decode_cursor(cursor) if cursor else None
        self._expire()
        entries = sorted(
            (
                (self._sessions[sid].last_used_at, sid)
                for sid in self._by_owner.get(owner, ())
                if after_cursor(self._sessions[sid].last_used_at, sid, after)
            ),
            reverse=True,
        )
        page = [
            SessionInfo(sid, self._sessions[sid].created, last_used)
            for last_used, sid in entries[:limit]
        ]
        more = len(entries) > limit
        return SessionPage(page, encode_cursor(*entries[limit - 1]) if more and page else None)

    async def close(self) -> None:
        self._sessions.clear()
        self._by_owner.clear()
