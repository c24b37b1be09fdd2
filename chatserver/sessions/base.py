"""What every session store does, so handlers never know which one runs.

A session is an ordered list of chat messages, ``{"role": "user"|"assistant",
"content": str}``, that expires ``ttl`` seconds after its last use (every call
that names a session refreshes it).

History holds finished turns only: ``append_turn`` stores the user message
and the assistant reply together, atomically, once the reply is complete. A
reply cut short by the client (an explicit cancel, or the WebSocket closing)
is stored with its partial text and ``"cancelled": true`` on the assistant
message, so the history shows what the user saw; a generation that failed
stores nothing, so the user may simply ask again.

Every session has an owner (``chatserver.api.auth.Principal.owner``; "" on a
server without API keys), set at creation. Every call names the caller's
owner, and a session of another owner is exactly like an unknown one.
``list_sessions`` pages through one owner's live sessions, most recently used first.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import secrets
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

Message = dict[str, Any]

_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")


class SessionStoreUnavailable(Exception):
    """The backing store cannot be reached; the request may be retried."""


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


class SessionStore(ABC):
    """Conversation histories keyed by session id."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl

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
        self, session_id: str, user: Message, assistant: Message, *, owner: str
    ) -> bool:
        """Append a finished turn atomically; False if the session is gone (or not ``owner``'s)."""

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
