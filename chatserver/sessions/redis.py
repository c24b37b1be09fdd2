"""The Redis session store: histories that survive restarts and are shared by servers.

Layout, under a key prefix (``chatserver:`` by default):

* ``{prefix}session:{id}`` a JSON string ``{"created": unix seconds, "owner": str}``:
  the session exists exactly while this key does (an empty history has no list);
* ``{prefix}session:{id}:messages`` a list of JSON messages, oldest first;
* ``{prefix}owner:{owner}:sessions`` a sorted set of the owner's session ids
  scored by last use (unix seconds), for listings.

Every call reads the session key first and treats another owner's session as
unknown (sessions stored before owners existed belong to "", the owner on a
server without API keys). The session keys carry the TTL, refreshed together
in one MULTI on every use, which also re-scores the id in its owner's set,
drops ids unused for a TTL from it and gives the set the TTL too, so it never
outgrows the owner's live sessions by much; a listing drops ids whose session
is gone. A turn is appended with WATCH on the session key and MULTI/EXEC for
RPUSH + EXPIRE, so a session deleted mid-generation is not brought back by its
last reply.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.exceptions import RedisError, WatchError

from chatserver.sessions.base import (
    Message,
    SessionInfo,
    SessionPage,
    SessionStore,
    SessionStoreUnavailable,
    after_cursor,
    decode_cursor,
    encode_cursor,
    new_session_id,
    valid_session_id,
)

DEFAULT_PREFIX = "chatserver:"
# Ids read from an owner's set per round trip while listing (at least a page).
LIST_BATCH = 64


def _meta_owner(raw: str | None) -> str | None:
    """The owner recorded in a session key's value; None when there is no session."""
    if raw is None:
        return None
    try:
        owner = json.loads(raw).get("owner", "")
    except (ValueError, AttributeError):
        return None
    return owner if isinstance(owner, str) else None


@asynccontextmanager
async def _unavailable_on_error() -> AsyncIterator[None]:
    try:
        yield
    except RedisError as exc:
        raise SessionStoreUnavailable(f"redis: {exc}") from exc


class RedisSessionStore(SessionStore):
    def __init__(
        self, url: str, ttl: float, prefix: str = DEFAULT_PREFIX, timeout: float | None = None
    ) -> None:
        super().__init__(ttl)
        self.prefix = prefix
        # With a timeout a stalled Redis raises (SessionStoreUnavailable) instead
        # of holding every request that touches a session.
        self._redis = aioredis.Redis.from_url(
            url,
            decode_responses=True,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
        )

    @property
    def _ttl_s(self) -> int:
        return max(1, int(self.ttl))

    def _keys(self, session_id: str) -> tuple[str, str]:
        meta = f"{self.prefix}session:{session_id}"
        return meta, meta + ":messages"

    def _index(self, owner: str) -> str:
        return f"{self.prefix}owner:{owner}:sessions"

    def _index_use(self, pipe: Pipeline, owner: str, session_id: str) -> None:
        """Queue: score the id by now in its owner's set, trim the set, refresh its TTL."""
        index, now = self._index(owner), time.time()
        pipe.zadd(index, {session_id: now})
        pipe.zremrangebyscore(index, "-inf", now - self.ttl)
        pipe.expire(index, self._ttl_s)

    async def _owned(self, session_id: str, owner: str) -> bool:
        """The session exists and is ``owner``'s (read before anything is touched)."""
        if not valid_session_id(session_id):
            return False
        meta, _ = self._keys(session_id)
        async with _unavailable_on_error():
            return _meta_owner(await self._redis.get(meta)) == owner

    async def check(self) -> None:
        async with _unavailable_on_error():
            await self._redis.ping()

    async def create(self, *, owner: str) -> str:
        session_id = new_session_id()
        meta, _ = self._keys(session_id)
        value = json.dumps({"created": int(time.time()), "owner": owner})
        async with _unavailable_on_error(), self._redis.pipeline(transaction=True) as pipe:
            pipe.set(meta, value, ex=self._ttl_s)
            self._index_use(pipe, owner, session_id)
            await pipe.execute()
        return session_id

    async def _touch(self, session_id: str, owner: str, read: bool) -> tuple[bool, list[str]]:
        if not await self._owned(session_id, owner):
            return False, []
        meta, msgs = self._keys(session_id)
        async with _unavailable_on_error(), self._redis.pipeline(transaction=True) as pipe:
            pipe.expire(meta, self._ttl_s)
            pipe.expire(msgs, self._ttl_s)
            if read:
                pipe.lrange(msgs, 0, -1)
            self._index_use(pipe, owner, session_id)
            result = await pipe.execute()
        return bool(result[0]), (result[2] if read else [])

    async def exists(self, session_id: str, *, owner: str) -> bool:
        live, _ = await self._touch(session_id, owner, read=False)
        return live

    async def messages(self, session_id: str, *, owner: str) -> list[Message] | None:
        live, raw = await self._touch(session_id, owner, read=True)
        return [json.loads(m) for m in raw] if live else None

    async def append_turn(
        self, session_id: str, user: Message, assistant: Message, *, owner: str
    ) -> bool:
        if not valid_session_id(session_id):
            return False
        meta, msgs = self._keys(session_id)
        encoded = [json.dumps(m, ensure_ascii=False) for m in (user, assistant)]
        async with _unavailable_on_error(), self._redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(meta)
                    if _meta_owner(await pipe.get(meta)) != owner:
                        await pipe.unwatch()
                        return False
                    pipe.multi()
                    pipe.rpush(msgs, *encoded)
                    pipe.expire(msgs, self._ttl_s)
                    pipe.expire(meta, self._ttl_s)
                    self._index_use(pipe, owner, session_id)
                    await pipe.execute()
                    return True
                except WatchError:
                    continue  # the session changed under us: look again

    async def delete(self, session_id: str, *, owner: str) -> bool:
        if not await self._owned(session_id, owner):
            return False
        async with _unavailable_on_error(), self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(*self._keys(session_id))
            pipe.zrem(self._index(owner), session_id)
            deleted, _ = await pipe.execute()
        return bool(deleted)

    async def list_sessions(
        self, *, owner: str, limit: int, cursor: str | None = None
    ) -> SessionPage:
        after = decode_cursor(cursor) if cursor else None
        index = self._index(owner)
        found: list[SessionInfo] = []
        gone: list[str] = []
        offset = 0
        async with _unavailable_on_error():
            await self._redis.zremrangebyscore(index, "-inf", time.time() - self.ttl)
            while len(found) <= limit:  # one more than a page says whether another follows
                rows = await self._redis.zrevrangebyscore(
                    index,
                    after[0] if after else "+inf",
                    "-inf",
                    start=offset,
                    num=max(LIST_BATCH, limit + 1),
                    withscores=True,
                )
                if not rows:
                    break
                offset += len(rows)
                rows = [(sid, score) for sid, score in rows if after_cursor(score, sid, after)]
                if not rows:
                    continue
                metas = await self._redis.mget([self._keys(sid)[0] for sid, _ in rows])
                for (sid, score), raw in zip(rows, metas, strict=True):
                    if _meta_owner(raw) != owner:
                        gone.append(sid)  # expired or deleted, its id left behind
                        continue
                    found.append(SessionInfo(sid, int(json.loads(raw)["created"]), score))
            if gone:
                await self._redis.zrem(index, *gone)
        page = found[:limit]
        more = len(found) > limit
        return SessionPage(
            page, encode_cursor(page[-1].last_used, page[-1].session_id) if more else None
        )

    async def close(self) -> None:
        await self._redis.aclose()
