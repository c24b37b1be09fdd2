"""Stored Responses API responses (``store: true``), beside the sessions they resemble.

A ``previous_response_id`` continues a conversation from a stored response, so
each record keeps what the next turn needs in one read: the chat messages of
the whole conversation so far (``history``: every earlier turn's input and
output, without the per-request ``instructions``) and the response object that
``GET /v1/responses/{id}`` answers. A chain of N turns is N records, each read
once; no turn walks the chain.

Like sessions, a record belongs to the caller's owner (another owner's is
unknown) and lives ``ttl`` seconds after its last use (a read or a write
refreshes it). Two backends, picked by the session store in use so that the
same ``--redis-url`` serves both:

* memory: a dict in this process, least recently used first, at most
  ``max_records`` (oldest dropped first);
* Redis: one JSON string per response at ``{prefix}response:{id}``, with the
  session TTL, read with GETEX so a read refreshes it. Another server on the
  same Redis continues any chain.
"""

from __future__ import annotations

import json
import re
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from chatserver.sessions.base import Message, SessionStore

# The in-process store's bound: responses carry whole conversations.
MAX_MEMORY_RECORDS = 10_000
# Ids the server issues: "resp_" and 32 hex digits; anything else is unknown.
_ID_RE = re.compile(r"resp_[A-Za-z0-9_-]{1,64}")


def valid_response_id(response_id: str) -> bool:
    """Ids a store could hold; a client-chosen id must not name another key."""
    return bool(_ID_RE.fullmatch(response_id))


@dataclass(slots=True)
class StoredResponse:
    """One response as stored: its object for retrieval, its conversation for chaining."""

    id: str
    owner: str
    response: dict[str, Any]
    # The conversation's chat messages through this response's output.
    history: list[Message] = field(default_factory=list)
    # This response's own input items, as GET .../input_items lists them (with ids).
    input_items: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)

    @classmethod
    def from_json(cls, raw: str) -> StoredResponse | None:
        try:
            data = json.loads(raw)
            items = data.get("input_items", [])  # records stored before items were
            return cls(data["id"], data["owner"], data["response"], data["history"], items)
        except (ValueError, KeyError, TypeError):
            return None


class ResponseStore(ABC):
    """Responses keyed by id, per owner, expiring ``ttl`` seconds after last use."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl

    @abstractmethod
    async def put(self, record: StoredResponse) -> None:
        """Store (or replace) a response."""

    @abstractmethod
    async def get(self, response_id: str, *, owner: str) -> StoredResponse | None:
        """The response, or None when unknown, expired or ``owner``'s not; refreshes its TTL."""

    @abstractmethod
    async def delete(self, response_id: str, *, owner: str) -> bool:
        """Forget the response; False if it was unknown (or not ``owner``'s)."""


class MemoryResponseStore(ResponseStore):
    """In this process; every method runs without awaiting, so each is atomic."""

    def __init__(
        self,
        ttl: float,
        clock: Callable[[], float] = time.monotonic,
        max_records: int = MAX_MEMORY_RECORDS,
    ) -> None:
        super().__init__(ttl)
        self._clock = clock
        self.max_records = max_records
        # id -> (last use, record), least recently used first
        self._records: OrderedDict[str, tuple[float, StoredResponse]] = OrderedDict()

    def __len__(self) -> int:
        self._expire()
        return len(self._records)

    def _expire(self) -> None:
        deadline = self._clock() - self.ttl
        while self._records:
            used, _ = next(iter(self._records.values()))
            if used > deadline and len(self._records) <= self.max_records:
                break
            self._records.popitem(last=False)

    async def put(self, record: StoredResponse) -> None:
        # A copy through JSON: what is stored is what Redis would give back.
        copy = StoredResponse.from_json(record.to_json())
        assert copy is not None
        self._records[record.id] = (self._clock(), copy)
        self._records.move_to_end(record.id)
        self._expire()

    async def get(self, response_id: str, *, owner: str) -> StoredResponse | None:
        self._expire()
        entry = self._records.get(response_id)
        if entry is None or entry[1].owner != owner:
            return None
        self._records[response_id] = (self._clock(), entry[1])
        self._records.move_to_end(response_id)
        return StoredResponse.from_json(entry[1].to_json())

    async def delete(self, response_id: str, *, owner: str) -> bool:
        self._expire()
        entry = self._records.get(response_id)
        if entry is None or entry[1].owner != owner:
            return False
        del self._records[response_id]
        return True


class RedisResponseStore(ResponseStore):
    """On the session store's Redis connection pool, under its key prefix."""

    def __init__(self, redis: Any, prefix: str, ttl: float) -> None:
        super().__init__(ttl)
        self._redis = redis
        self.prefix = prefix

    def _key(self, response_id: str) -> str:
        return f"{self.prefix}response:{response_id}"

    @property
    def _ttl_s(self) -> int:
        return max(1, int(self.ttl))

    async def put(self, record: StoredResponse) -> None:
        from chatserver.sessions.redis import unavailable_on_error

        async with unavailable_on_error():
            await self._redis.set(self._key(record.id), record.to_json(), ex=self._ttl_s)

    async def get(self, response_id: str, *, owner: str) -> StoredResponse | None:
        from chatserver.sessions.redis import unavailable_on_error

        if not valid_response_id(response_id):
            return None
        async with unavailable_on_error():
            raw = await self._redis.getex(self._key(response_id), ex=self._ttl_s)
        record = None if raw is None else StoredResponse.from_json(raw)
        return record if record is not None and record.owner == owner else None

    async def delete(self, response_id: str, *, owner: str) -> bool:
        from chatserver.sessions.redis import unavailable_on_error

        if await self.get(response_id, owner=owner) is None:
            return False
        async with unavailable_on_error():
            return bool(await self._redis.delete(self._key(response_id)))


def open_response_store(sessions: SessionStore) -> ResponseStore:
    """The response store beside ``sessions``: the same Redis (and prefix, TTL), or memory."""
    from chatserver.sessions.redis import RedisSessionStore

    if isinstance(sessions, RedisSessionStore):
        return RedisResponseStore(sessions.redis, sessions.prefix, sessions.ttl)
    return MemoryResponseStore(sessions.ttl)
