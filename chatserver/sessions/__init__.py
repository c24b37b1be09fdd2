"""Conversation store: in-process memory (default) or Redis, picked by settings.redis_url."""

from __future__ import annotations

from chatserver.config import Settings
from chatserver.sessions.base import SessionBusy, SessionStore, SessionStoreUnavailable


def open_store(settings: Settings) -> SessionStore:
    """The store the settings ask for; the caller closes it."""
    if settings.redis_url:
        from chatserver.sessions.redis import RedisSessionStore

        return RedisSessionStore(
            settings.redis_url,
            ttl=settings.session_ttl,
            prefix=settings.redis_prefix,
            timeout=settings.redis_timeout,
            max_messages=settings.max_history_messages,
        )
    from chatserver.sessions.memory import MemorySessionStore

    return MemorySessionStore(ttl=settings.session_ttl, max_messages=settings.max_history_messages)


__all__ = ["SessionBusy", "SessionStore", "SessionStoreUnavailable", "open_store"]
