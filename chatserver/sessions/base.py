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
"""

from __future__ import annotations

import re
import uuid
from abc import ABC, abstractmethod
from typing import Any

Message = dict[str, Any]

_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")


class SessionStoreUnavailable(Exception):
    """The backing store cannot be reached; the request may be retried."""


def new_session_id() -> str:
    return uuid.uuid4().hex


def valid_session_id(session_id: str) -> bool:
    """Ids a store could have issued; anything else is simply not found.

    Stores build keys from ids, so a client-chosen id must not be able to name
    another session's key.
    """
    return bool(_ID_RE.fullmatch(session_id))


class SessionStore(ABC):
    """Conversation histories keyed by session id."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl

    @abstractmethod
    async def check(self) -> None:
        """Raise SessionStoreUnavailable if the store cannot be reached (checked at startup)."""

    @abstractmethod
    async def create(self) -> str:
        """Start an empty session and return its id."""

    @abstractmethod
    async def exists(self, session_id: str) -> bool:
        """True if the session is live; refreshes its TTL."""

    @abstractmethod
    async def messages(self, session_id: str) -> list[Message] | None:
        """The session's messages, oldest first, or None when unknown; refreshes its TTL."""

    @abstractmethod
    async def append_turn(self, session_id: str, user: Message, assistant: Message) -> bool:
        """Append a finished turn atomically; False if the session is gone."""

    @abstractmethod
    async def delete(self, session_id: str) -> bool:
        """Forget the session; False if it was unknown."""

    @abstractmethod
    async def close(self) -> None:
        """Release connections; the store is unusable afterwards."""
