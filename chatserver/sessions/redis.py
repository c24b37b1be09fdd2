"""The Redis session store: histories that survive restarts and are shared by servers.

Layout, under a key prefix (``chatserver:`` by default):

* ``{prefix}session:{id}`` a JSON string ``{"created": unix seconds}``: the session
  exists exactly while this key does (an empty history has no list);
* ``{prefix}session:{id}:messages`` a list of JSON messages, oldest first.

Both keys carry the TTL, refreshed together in one MULTI on every use. A turn
is appended with WATCH on the session key and MULTI/EXEC for RPUSH + EXPIRE,
so a session deleted mid-generation is not brought back by its last reply.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis.asyncio as aioredis
from redis.exceptions import RedisError, WatchError

from chatserver.sessions.base import (
    Message,
    SessionStore,
    SessionStoreUnavailable,
    new_session_id,
    valid_session_id,
)

DEFAULT_PREFIX = "chatserver:"


@asynccontextmanager
async def _unavailable_on_error() -> AsyncIterator[None]:
    try:
        yield
    except RedisError as exc:
        raise SessionStoreUnavailable(f"redis: {exc}") from exc


class RedisSessionStore(SessionStore):
    def __init__(self, url: str, ttl: float, prefix: str = DEFAULT_PREFIX) -> None:
        super().__init__(ttl)
        self.prefix = prefix
        self._redis = aioredis.Redis.from_url(url, decode_responses=True)

    @property
    def _ttl_s(self) -> int:
        return max(1, int(self.ttl))

    def _keys(self, session_id: str) -> tuple[str, str]:
        meta = f"{self.prefix}session:{session_id}"
        return meta, meta + ":messages"

    async def check(self) -> None:
        async with _unavailable_on_error():
            await self._redis.ping()

    async def create(self) -> str:
        session_id = new_session_id()
        meta, _ = self._keys(session_id)
        async with _unavailable_on_error():
            await self._redis.set(meta, json.dumps({"created": int(time.time())}), ex=self._ttl_s)
        return session_id

    async def _touch(self, session_id: str, read: bool) -> tuple[bool, list[str]]:
        meta, msgs = self._keys(session_id)
        async with _unavailable_on_error(), self._redis.pipeline(transaction=True) as pipe:
            pipe.expire(meta, self._ttl_s)
            pipe.expire(msgs, self._ttl_s)
            if read:
                pipe.lrange(msgs, 0, -1)
            result = await pipe.execute()
        return bool(result[0]), (result[2] if read else [])

    async def exists(self, session_id: str) -> bool:
        if not valid_session_id(session_id):
            return False
        live, _ = await self._touch(session_id, read=False)
        return live

    async def messages(self, session_id: str) -> list[Message] | None:
        if not valid_session_id(session_id):
            return None
        live, raw = await self._touch(session_id, read=True)
        return [json.loads(m) for m in raw] if live else None

    async def append_turn(self, session_id: str, user: Message, assistant: Message) -> bool:
        if not valid_session_id(session_id):
            return False
        meta, msgs = self._keys(session_id)
        encoded = [json.dumps(m, ensure_ascii=False) for m in (user, assistant)]
        async with _unavailable_on_error(), self._redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(meta)
                    if not await pipe.exists(meta):
                        await pipe.unwatch()
                        return False
                    pipe.multi()
                    pipe.rpush(msgs, *encoded)
                    pipe.expire(msgs, self._ttl_s)
                    pipe.expire(meta, self._ttl_s)
                    await pipe.execute()
                    return True
                except WatchError:
                    continue  # the session changed under us: look again

    async def delete(self, session_id: str) -> bool:
        if not valid_session_id(session_id):
            return False
        async with _unavailable_on_error():
            return bool(await self._redis.delete(*self._keys(session_id)) > 0)

    async def close(self) -> None:
        await self._redis.aclose()
