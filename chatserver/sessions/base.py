"""What every session store does, so handlers never know which one runs.

A session is an ordered list of chat messages, ``{"role": "user"|"assistant",
"content": str}``, that expires ``ttl`` seconds after its last use (every call
that names a session refreshes it). Tool calling (/ws) adds two shapes: an
assistant message with ``"tool_calls": [{"id", "name", "arguments"}]`` (and
the ``"tools"`` and ``"parallel_tool_calls"`` it chose from), and
``{"role": "tool", "tool_call_id": str, "content": str}`` results; a turn
that answers calls opens with its tool messages instead of a user message.

History holds finished turns only: ``append_turn`` stores the user message
and the assistant reply together, atomically, once the reply is complete. A
reply cut short by the client (an explicit cancel, or the WebSocket closing)
is stored with its partial text and ``"cancelled": true`` on the assistant
message, so the history shows what the user saw; a generation that failed
stores nothing, so the user may simply ask again. A session keeps at most
``max_messages`` messages (0: no cap): a turn that would pass it drops the
oldest turns, a quarter of the cap at once (``kept_under_cap``), so that the
oldest message kept, and with it the start of the session's prompt, stays the
same for many turns instead of moving on every turn (a KV prefix cache reuses
a prompt only if the next one starts with it).

Turns of one session run one at a time (``turn_lock``): a turn reads the
history, generates and appends while holding the session's lock, so a second
client on the same session waits for the first turn and then sees it in its
history, instead of both generating from the same history and appending in
finish order.

Every session has an owner (``chatserver.api.auth.Principal.owner``; "" on a
server without API keys), set at creation. Every call names the caller's
owner, and a session of another owner is exactly like an unknown one.
``list_sessions`` pages through one owner's live sessions, most recently used first.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
import secrets
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

Message = dict[str, Any]

_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")


class SessionStoreUnavailable(Exception):
    """The backing store cannot be reached; the request may be retried."""


class SessionBusy(Exception):
    """Another turn held the session for longer than this one could wait."""

    def __init__(self, waited: float) -> None:
        super().__init__(
            f"the session's previous message was still being answered after {waited:g} s "
            "(--request-timeout); send this one again"
        )
        self.waited = waited


def kept_under_cap(count: int, max_messages: int) -> int:
    """How many of a session's `count` newest messages to keep under `max_messages` (0: all).

    Up to the cap, all; past it, three quarters of the cap, in whole turns
    (user message and reply), so the cut happens once every quarter of the cap.
    """
    if max_messages <= 0 or count <= max_messages:
        return count
    keep = max_messages - max_messages // 4
    return max(2, keep - keep % 2)


def turn_messages(user: Message | list[Message], assistant: Message) -> list[Message]:
    """A turn's messages in order, copied: what it answers, then the reply."""
    opening = [user] if isinstance(user, dict) else user
    return [dict(m) for m in opening] + [dict(assistant)]


def new_session_id() -> str:
    """128 random bits as 32 hex digits: a session id is a bearer credential."""
    return secrets.token_hex(16)


def valid_session_id(session_id: str) -> bool:
    """Ids a store could have issued; anything else is simply not found.

    Stores build keys from ids, so a client-chosen id must not be able to name
    another session's key.
    """
    return bool(_ID_RE.fullmatch(session_id))


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """One entry of a session listing; times in unix seconds."""

    session_id: str
    created: int
    last_used: float


@dataclass(frozen=True, slots=True)
class SessionPage:
    """A page of a listing; ``next_cursor`` None on the last page."""

    sessions: list[SessionInfo]
    next_cursor: str | None


class InvalidCursor(ValueError):
    """A listing cursor this store did not issue."""


def encode_cursor(last_used: float, session_id: str) -> str:
    """An opaque, URL-safe cursor: the position after (last_used, session_id)."""
    raw = json.dumps([last_used, session_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[float, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        last_used, session_id = json.loads(raw)
    except (binascii.Error, ValueError, TypeError):
        raise InvalidCursor(cursor) from None
    if not isinstance(last_used, int | float) or not isinstance(session_id, str):
        raise InvalidCursor(cursor)
    return float(last_used), session_id


def after_cursor(last_used: float, session_id: str, cursor: tuple[float, str] | None) -> bool:
    """Whether an entry comes after the cursor in (last_used, id) descending order."""
    return cursor is None or (last_used, session_id) < cursor


class TurnLocks:
    """One asyncio lock per session id in this process, forgotten when nobody holds or wants it.

    Waiters are served in arrival order. The memory store's turn lock; the
    Redis store queues a process's own turns here before it asks Redis.
    """

    @dataclass(slots=True)
    class _Entry:
        lock: asyncio.Lock = field(default_factory=asyncio.Lock)
        users: int = 0  # holding or waiting

    def __init__(self) -> None:
        self._locks: dict[str, TurnLocks._Entry] = {}

    def __len__(self) -> int:
        return len(self._locks)

    @asynccontextmanager
    async def hold(self, session_id: str, wait: float | None) -> AsyncIterator[None]:
        """Hold the session's lock; SessionBusy if it was not free within `wait` s (None: any)."""
        entry = self._locks.get(session_id)
        if entry is None:
            entry = self._locks[session_id] = TurnLocks._Entry()
        entry.users += 1
        try:
            try:
                async with asyncio.timeout(wait):
                    await entry.lock.acquire()
            except TimeoutError:
                raise SessionBusy(wait or 0.0) from None
            try:
                yield
            finally:
                entry.lock.release()
        finally:
            entry.users -= 1
            if not entry.users:
                del self._locks[session_id]


class SessionStore(ABC):
    """Conversation histories keyed by session id."""

    def __init__(self, ttl: float, max_messages: int = 0) -> None:
        self.ttl = ttl
        self.max_messages = max_messages

    @abstractmethod
    async def check(self) -> None:
        """Raise SessionStoreUnavailable if the store cannot be reached (checked at startup)."""

    @abstractmethod
    async def create(self, *, owner: str) -> str:
        """Start an empty session of ``owner`` and return its id."""

    @abstractmethod
    async def exists(self, session_id: str, *, owner: str) -> bool:
        """True if the session is live and ``owner``'s; refreshes its TTL."""

    @abstractmethod
    async def messages(self, session_id: str, *, owner: str) -> list[Message] | None:
        """The session's messages, oldest first, or None when unknown (or not
        ``owner``'s); refreshes its TTL."""

    @abstractmethod
    async def append_turn(
        self, session_id: str, user: Message | list[Message], assistant: Message, *, owner: str
    ) -> bool:
        """Append a finished turn atomically; False if the session is gone (or not ``owner``'s).

        ``user``: the user message, or the messages the reply answers (tool results).
        """

    @abstractmethod
    def turn_lock(self, session_id: str, wait: float | None) -> AbstractAsyncContextManager[None]:
        """Hold the session for one turn: while held, no other turn of it starts.

        Waits up to `wait` seconds (None: as long as it takes) for the turn
        before, then raises SessionBusy. Across servers when the store is
        shared (Redis). An id no store could have issued is not locked.
        """

    @abstractmethod
    async def delete(self, session_id: str, *, owner: str) -> bool:
        """Forget the session; False if it was unknown (or not ``owner``'s)."""

    @abstractmethod
    async def list_sessions(
        self, *, owner: str, limit: int, cursor: str | None = None
    ) -> SessionPage:
        """``owner``'s live sessions, most recently used first, ``limit`` a page.

        Raises InvalidCursor for a cursor this store did not issue. A session
        used while a client pages moves to the front, so later pages skip it.
        """

    @abstractmethod
    async def close(self) -> None:
        """Release connections; the store is unusable afterwards."""
