"""The embedded session store: a dict in this process, the default without Redis.

Sessions live as long as the process (and ``ttl`` seconds after their last
use). Every method runs without awaiting, so each is atomic on the event loop.
Expired sessions are dropped lazily: sessions are kept in least-recently-used
order, so each call pops the expired ones from the front in amortised O(1).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from chatserver.sessions.base import Message, SessionStore, new_session_id, valid_session_id


class MemorySessionStore(SessionStore):
    def __init__(self, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(ttl)
        self._clock = clock
        # session id -> (last use, messages), least recently used first
        self._sessions: OrderedDict[str, tuple[float, list[Message]]] = OrderedDict()

    def _expire(self) -> None:
        deadline = self._clock() - self.ttl
        while self._sessions:
            session_id, (last_used, _) = next(iter(self._sessions.items()))
            if last_used > deadline:
                break
            del self._sessions[session_id]

    def _touch(self, session_id: str) -> list[Message] | None:
        self._expire()
        if not valid_session_id(session_id):
            return None
        entry = self._sessions.get(session_id)
        if entry is None:
            return None
        self._sessions[session_id] = (self._clock(), entry[1])
        self._sessions.move_to_end(session_id)
        return entry[1]

    def __len__(self) -> int:
        self._expire()
        return len(self._sessions)

    async def check(self) -> None:
        return None

    async def create(self) -> str:
        self._expire()
        session_id = new_session_id()
        self._sessions[session_id] = (self._clock(), [])
        return session_id

    async def exists(self, session_id: str) -> bool:
        return self._touch(session_id) is not None

    async def messages(self, session_id: str) -> list[Message] | None:
        history = self._touch(session_id)
        return None if history is None else [dict(m) for m in history]

    async def append_turn(self, session_id: str, user: Message, assistant: Message) -> bool:
        history = self._touch(session_id)
        if history is None:
            return False
        history.extend((dict(user), dict(assistant)))
        return True

    async def delete(self, session_id: str) -> bool:
        self._expire()
        return self._sessions.pop(session_id, None) is not None

    async def close(self) -> None:
        self._sessions.clear()
