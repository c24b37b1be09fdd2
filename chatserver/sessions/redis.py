"""The Redis session store: histories that survive restarts and are shared by servers.

Layout, under a key prefix (``chatserver:`` by default):

* ``{prefix}session:{id}`` a JSON string ``{"created": unix seconds, "owner": str}``:
  the session exists exactly while this key does (an empty history has no list);
* ``{prefix}session:{id}:messages`` a list of JSON messages, oldest first;
* ``{prefix}owner:{owner}:sessions`` a sorted set of the owner's session ids
  scored by last use (unix seconds), for listings;
* ``{prefix}session:{id}:lock`` while a turn of the session runs: a random
  token of the server holding it, with an expiry (``lock_ttl``, 10 s) that the
  holder renews every third of it, so the lock of a server that died frees
  itself within seconds.

Every call reads the session key first and treats another owner's session as
unknown (sessions stored before owners existed belong to "", the owner on a
server without API keys). The session keys carry the TTL, refreshed together
in one MULTI on every use, which also re-scores the id in its owner's set,
drops ids unused for a TTL from it and gives the set the TTL too, so it never
outgrows the owner's live sessions by much; a listing drops ids whose session
is gone. A turn is appended with WATCH on the session key and MULTI/EXEC for
RPUSH + EXPIRE (and LTRIM past the history cap), so a session deleted
mid-generation is not brought back by its last reply.

Turns of a session are serialized across every server sharing the Redis: a
server's own turns queue in order on a lock in the process (``TurnLocks``),
and the one in front takes the Redis lock with SET NX PX, trying again after
10 ms, doubling to 100 ms, while another server holds it. It is given back
with a compare-and-delete script, so a server whose lock expired never
deletes the next holder's.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.exceptions import RedisError, WatchError

from chatserver.sessions.base import (
    Message,
    SessionBusy,
    SessionInfo,
    SessionPage,
    SessionStore,
    SessionStoreUnavailable,
    TurnLocks,
    after_cursor,
    decode_cursor,
    encode_cursor,
    kept_under_cap,
    new_session_id,
    turn_messages,
    valid_session_id,
)

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "chatserver:"
# Ids read from an owner's set per round trip while listing (at least a page).
LIST_BATCH = 64
# A turn lock's expiry, renewed every third of it while the turn runs.
LOCK_TTL_S = 10.0
# The first and the longest pause between tries for a lock another server holds.
LOCK_RETRY_S = (0.01, 0.1)
# Only the holder's token renews or frees a lock (KEYS[1] the lock, ARGV[1] the token).
_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('del', KEYS[1])
end
return 0
"""


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


# For stores built on this one's connection (sessions/responses.py).
unavailable_on_error = _unavailable_on_error


class RedisSessionStore(SessionStore):
    def __init__(
        self,
        url: str,
        ttl: float,
        prefix: str = DEFAULT_PREFIX,
        timeout: float | None = None,
        max_messages: int = 0,
        lock_ttl: float = LOCK_TTL_S,
    ) -> None:
        super().__init__(ttl, max_messages)
        self.prefix = prefix
        self.lock_ttl = lock_ttl
        self._turns = TurnLocks()
        self._background: set[asyncio.Task[None]] = set()
        self._retries: set[asyncio.Task[None]] = set()  # locks Redis did not take back
        # With a timeout a stalled Redis raises (SessionStoreUnavailable) instead
        # of holding every request that touches a session.
        self._redis = aioredis.Redis.from_url(
            url,
            decode_responses=True,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
        )
        self._renew_script = self._redis.register_script(_RENEW)
        self._release_script = self._redis.register_script(_RELEASE)

    @property
    def redis(self) -> aioredis.Redis:
        """The connection pool, shared by stores built on this one (sessions/responses.py)."""
        return self._redis

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
        self, session_id: str, user: Message | list[Message], assistant: Message, *, owner: str
    ) -> bool:
        if not valid_session_id(session_id):
            return False
        meta, msgs = self._keys(session_id)
        encoded = [json.dumps(m, ensure_ascii=False) for m in turn_messages(user, assistant)]
        async with _unavailable_on_error(), self._redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(meta, msgs)
                    if _meta_owner(await pipe.get(meta)) != owner:
                        await pipe.unwatch()
                        return False
                    count = await pipe.llen(msgs) + len(encoded)
                    keep = kept_under_cap(count, self.max_messages)
                    pipe.multi()
                    pipe.rpush(msgs, *encoded)
                    if keep < count:
                        pipe.ltrim(msgs, -keep, -1)
                    pipe.expire(msgs, self._ttl_s)
                    pipe.expire(meta, self._ttl_s)
                    self._index_use(pipe, owner, session_id)
                    await pipe.execute()
                    return True
                except WatchError:
                    continue  # the session changed under us: look again

    @asynccontextmanager
    async def turn_lock(self, session_id: str, wait: float | None) -> AsyncIterator[None]:
        if not valid_session_id(session_id):
            yield
            return
        loop = asyncio.get_running_loop()
        deadline = None if wait is None else loop.time() + wait
        async with self._turns.hold(session_id, wait):
            left = None if deadline is None else max(0.0, deadline - loop.time())
            key = f"{self.prefix}session:{session_id}:lock"
            token = await self._lock(key, left, wait)
            renewing = asyncio.create_task(self._keep_lock(key, token))
            try:
                yield
            finally:
                renewing.cancel()
                # Given back even if this task is cancelled meanwhile.
                await asyncio.shield(self._in_background(self._unlock(key, token)))

    async def _lock(self, key: str, left: float | None, wait: float | None) -> str:
        """Take the Redis lock within `left` seconds; its token."""
        token = secrets.token_hex(16)
        pause = LOCK_RETRY_S[0]
        try:
            async with asyncio.timeout(left):
                while not await self._redis.set(key, token, nx=True, px=self._lock_ttl_ms):
                    await asyncio.sleep(pause)
                    pause = min(2 * pause, LOCK_RETRY_S[1])
        except BaseException as exc:
            # A SET cut short (timed out, cancelled, connection lost) may have
            # taken the lock all the same: give it back.
            self._in_background(self._unlock(key, token))
            if isinstance(exc, RedisError):
                raise SessionStoreUnavailable(f"redis: {exc}") from exc
            if isinstance(exc, TimeoutError):
                raise SessionBusy(wait or 0.0) from None
            raise
        return token

    @property
    def _lock_ttl_ms(self) -> int:
        return max(1, int(self.lock_ttl * 1000))

    async def _keep_lock(self, key: str, token: str) -> None:
        """Renew the lock while its turn runs (cancelled when the turn ends)."""
        while True:
            await asyncio.sleep(self.lock_ttl / 3)
            try:
                if not await self._renew_script(keys=[key], args=[token, self._lock_ttl_ms]):
                    log.warning(
                        "a session's turn lock expired before its turn ended (Redis or this "
                        "server stalled for %g s): another turn of it may have started",
                        self.lock_ttl,
                    )
                    return
            except RedisError as exc:
                log.warning("could not renew a session's turn lock: %s", exc)

    async def _unlock(self, key: str, token: str) -> None:
        """Give the lock back; if Redis does not answer, keep trying in the background.

        A lock left behind holds the session's next turn until it expires (up to
        `lock_ttl`), though Redis may be back within a second
        (tests/test_sessions.py, the stalled-Redis test).
        """
        try:
            await self._release_script(keys=[key], args=[token])
        except RedisError:
            expires = asyncio.get_running_loop().time() + self.lock_ttl
            retry = asyncio.create_task(self._unlock_until(key, token, expires))
            self._retries.add(retry)
            retry.add_done_callback(self._retries.discard)

    async def _unlock_until(self, key: str, token: str, expires: float) -> None:
        loop = asyncio.get_running_loop()
        pause = LOCK_RETRY_S[1]
        while True:
            await asyncio.sleep(pause)
            try:
                await self._release_script(keys=[key], args=[token])
                return
            except RedisError as exc:
                if loop.time() + 2 * pause >= expires:  # it expires by itself
                    log.warning("could not release a session's turn lock: %s", exc)
                    return
            pause = min(2 * pause, 1.0)

    def _in_background(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run `work` to its end even if whoever started it is cancelled."""
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

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
        for retry in self._retries:  # those locks expire by themselves
            retry.cancel()
        if self._background:  # locks being given back
            await asyncio.wait(self._background, timeout=self.lock_ttl)
        await self._redis.aclose()
