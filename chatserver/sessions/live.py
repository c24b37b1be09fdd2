"""Live delivery: a session's running reply reaches every socket attached to it, on any server.

Each session has a *channel*: an ordered, bounded log of the frames its
replies produced, kept ``ttl`` seconds after the last one. The server that
generates a reply appends its frames (the user message, token chunks with
their character ``offset``, then ``done`` or ``error``) as it sends them to
its own client; every other socket attached to the session, on this server
or another, follows the channel and forwards what it did not produce itself.
A client that lost its socket asks any server to *resume* a reply from an
offset: that server reads the reply back from the channel, from its start,
skips what the client already has, and follows on live.

Why Redis Streams (``XADD`` with ``MAXLEN ~`` and a ``PEXPIRE``), not pub/sub:
pub/sub delivers only to whoever is subscribed at that instant, so a reconnect
(the very case this is for) would find nothing to replay, and a subscriber
attaching between two messages could miss one. A stream is the log itself:
entries have ordered ids, a reader asks for "everything after id X" and gets
it whether it was listening then or not, so replay, live reading and the
hand-over between them (``follow``: watch first, then read back, drop what
came twice) are one mechanism. ``MAXLEN ~`` bounds a session's log (trimmed in
whole macro nodes, cheap) and the TTL, refreshed by every append, forgets it
once the session is quiet.

One reader task per server serves every socket that follows a channel there
(one blocking ``XREAD`` over all followed streams on one connection), so the
Redis connections a server holds do not grow with its sockets; a newly
followed stream interrupts that read (``CLIENT UNBLOCK``) to join it.

Channel entries are plain frames (``chatserver.protocol.ws``) plus the id of
the socket that published them (``origin``). Besides the reply frames, a
socket that resumes a reply appends the client's own ``resume`` frame (and a
later ``cancel`` for it), so that the server still generating a reply whose
socket went away knows somebody took it over (``hold_detached``).

The in-process channel (``MemoryLiveChannel``) is the default without Redis:
several sockets on one server see each other's replies the same way.

Costs: one entry per token chunk a reply sends (fewer under load: a
publisher merges the chunks queued while its previous append was in flight),
about 320 bytes each in the in-process channel (measured with tracemalloc),
kept ``--live-ttl`` seconds; with Redis, one pipelined ``XADD`` round trip per
flush, and the generating server reads its own entries back when its own
socket follows the session. The reader's single ``XREAD`` names several keys,
so a Redis Cluster would need one reader per shard (not done: one Redis, or a
primary with replicas, is what this is written for).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from chatserver.config import Settings
from chatserver.sessions.base import SessionStoreUnavailable

log = logging.getLogger(__name__)

Frame = dict[str, Any]

# Entries a session's channel keeps at most (approximately, for Redis): several
# long replies, one entry per token chunk.
MAXLEN = 20_000
# Entries one follower may have waiting before it falls back to reading the log.
WATCH_QUEUE = 4096
# A Redis reader's longest blocking read; a new stream normally joins at once
# (CLIENT UNBLOCK), this bounds the wait when that races with the read.
BLOCK_MS = 1000
# Most entries the Redis reader takes per read.
READ_COUNT = 512
# Frame types that make up a reply; a channel also carries control frames.
REPLY_FRAMES = frozenset({"user", "tool_results", "token", "tool_calls", "done", "error"})
# The frames a reply starts with: its user message, or the tool results it continues from.
START_FRAMES = frozenset({"user", "tool_results"})
END_FRAMES = frozenset({"done", "error"})


class LiveUnavailable(SessionStoreUnavailable):
    """The channel's store (Redis) cannot be reached: like the session store's outage."""


@dataclass(frozen=True, slots=True)
class LiveEntry:
    """One frame in a session's channel; ``pos`` orders entries ("<int>-<int>")."""

    pos: str
    origin: str
    frame: Frame


@dataclass(frozen=True, slots=True)
class ReplyInfo:
    """Where a reply starts in its channel, and what the channel holds of it so far."""

    start: str  # the position of its user frame
    length: int  # characters of reply text retained
    finished: bool


def pos_key(pos: str) -> tuple[int, int]:
    """A position's sort key: Redis stream ids compare as pairs of integers."""
    ms, _, seq = pos.partition("-")
    return int(ms), int(seq or 0)


@dataclass(slots=True, eq=False)
class _Watcher:
    """A follower's inbox; ``resync`` means: read the log again after what you have."""

    queue: asyncio.Queue[LiveEntry] = field(
        default_factory=lambda: asyncio.Queue(maxsize=WATCH_QUEUE)
    )
    resync: bool = True  # the first thing a follower does is read back

    def put(self, entry: LiveEntry) -> None:
        try:
            self.queue.put_nowait(entry)
        except asyncio.QueueFull:
            self.resync = True  # the log still has it


class LiveChannel(ABC):
    """Per-session channels of reply frames; one instance per server."""

    def __init__(self, ttl: float, maxlen: int = MAXLEN) -> None:
        self.ttl = ttl
        self.maxlen = maxlen
        self._watchers: dict[str, set[_Watcher]] = {}
        self._background: set[asyncio.Task[Any]] = set()

    @abstractmethod
    async def check(self) -> None:
        """Raise LiveUnavailable if the channel's store cannot be reached."""

    @abstractmethod
    async def publish(self, session_id: str, origin: str, frames: list[Frame]) -> None:
        """Append frames to the session's channel, in order; refreshes its TTL."""

    @abstractmethod
    async def entries(self, session_id: str, after: str | None = None) -> list[LiveEntry]:
        """The retained entries after position ``after`` (None: all), oldest first."""

    @abstractmethod
    async def last_pos(self, session_id: str) -> str:
        """The position of the newest entry ("0-0" for an empty channel)."""

    def _watch_started(self, session_id: str, after: str) -> None:  # noqa: B027
        """A session got its first watcher here (the Redis reader joins its stream)."""

    def _watch_ended(self, session_id: str) -> None:  # noqa: B027
        """A session's last watcher here left."""

    @asynccontextmanager
    async def _watch(self, session_id: str, after: str) -> AsyncIterator[_Watcher]:
        watcher = _Watcher()
        watchers = self._watchers.setdefault(session_id, set())
        watchers.add(watcher)
        if len(watchers) == 1:
            self._watch_started(session_id, after)
        try:
            yield watcher
        finally:
            watchers.discard(watcher)
            if not watchers:
                del self._watchers[session_id]
                self._watch_ended(session_id)

    def _deliver(self, session_id: str, entry: LiveEntry) -> None:
        for watcher in self._watchers.get(session_id, ()):
            watcher.put(entry)

    async def follow(self, session_id: str, after: str | None = None) -> AsyncIterator[LiveEntry]:
        """Every entry after ``after`` (None: from now on), then each new one, until closed.

        Registers for new entries first and reads the log after that, so
        nothing published in between is lost; what arrives both ways is
        dropped the second time by its position.
        """
        last = after if after is not None else await self.last_pos(session_id)
        async with self._watch(session_id, last) as watcher:
            while True:
                if watcher.resync:
                    watcher.resync = False
                    for entry in await self.entries(session_id, last):
                        last = entry.pos
                        yield entry
                    continue
                entry = await watcher.queue.get()
                if pos_key(entry.pos) <= pos_key(last):
                    continue
                last = entry.pos
                yield entry

    async def find_reply(self, session_id: str, reply_id: str) -> ReplyInfo | None:
        """The newest reply of that message id in the channel; None if none is retained."""
        info: ReplyInfo | None = None
        for entry in await self.entries(session_id):
            frame = entry.frame
            if frame.get("id") != reply_id:
                continue
            kind = frame.get("type")
            if kind in START_FRAMES:
                info = ReplyInfo(entry.pos, 0, False)
            elif info is None or info.finished:
                continue
            elif kind == "token":
                end = frame["offset"] + len(frame["content"])
                info = ReplyInfo(info.start, max(info.length, end), False)
            elif kind in END_FRAMES:
                info = ReplyInfo(info.start, info.length, True)
        return info

    async def reply_frames(
        self, session_id: str, reply_id: str, reply: ReplyInfo, offset: int
    ) -> AsyncIterator[Frame]:
        """Reply ``reply_id``'s frames from character ``offset`` on (and its tool_calls
        frame), ending with done/error.

        Token frames are cut so the first one starts exactly at ``offset``;
        each keeps its ``offset`` field. Follows the channel while the reply runs.
        """
        async with aclosing(self.follow(session_id, reply.start)) as entries:
            async for entry in entries:
                frame = entry.frame
                kind = frame.get("type")
                if frame.get("id") != reply_id:
                    continue
                if kind in START_FRAMES:
                    return  # a newer reply under the same id: this one ended unseen
                if kind == "token":
                    start, text = frame["offset"], frame["content"]
                    if start + len(text) <= offset:
                        continue
                    cut = max(0, offset - start)
                    yield dict(frame, content=text[cut:], offset=start + cut)
                elif kind == "tool_calls":
                    yield dict(frame)  # after all of the reply's text, before its end
                elif kind in END_FRAMES:
                    yield dict(frame)  # its client's socket adds its own request id
                    return

    def keep(self, task: asyncio.Task[Any]) -> asyncio.Task[Any]:
        """Hold a reference to work that outlives its socket (a detached reply) until close."""
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def spawn(self, work: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        return self.keep(asyncio.create_task(work))

    async def close(self, wait: float = 2.0) -> None:
        """Let background work (publishes, detached replies) end for ``wait`` s, then cancel it."""
        if self._background:
            _, pending = await asyncio.wait(set(self._background), timeout=wait)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=wait)


@dataclass(slots=True)
class _Log:
    entries: list[LiveEntry] = field(default_factory=list)
    expires: float = 0.0


class MemoryLiveChannel(LiveChannel):
    """Channels in this process: live delivery between sockets of one server."""

    def __init__(
        self, ttl: float, maxlen: int = MAXLEN, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__(ttl, maxlen)
        self._clock = clock
        self._logs: OrderedDict[str, _Log] = OrderedDict()  # least recently appended first
        self._seq = 0  # positions never repeat in a process, even for a re-made log

    def _expire(self) -> None:
        now = self._clock()
        while self._logs:
            session_id, entry_log = next(iter(self._logs.items()))
            if entry_log.expires > now:
                break
            del self._logs[session_id]

    async def check(self) -> None:
        return None

    async def publish(self, session_id: str, origin: str, frames: list[Frame]) -> None:
        self._expire()
        entry_log = self._logs.pop(session_id, None) or _Log()
        self._logs[session_id] = entry_log
        entry_log.expires = self._clock() + self.ttl
        for frame in frames:
            self._seq += 1
            entry = LiveEntry(f"{self._seq}-0", origin, frame)
            entry_log.entries.append(entry)
            self._deliver(session_id, entry)
        if len(entry_log.entries) > self.maxlen:
            del entry_log.entries[: len(entry_log.entries) - self.maxlen]

    async def entries(self, session_id: str, after: str | None = None) -> list[LiveEntry]:
        self._expire()
        entry_log = self._logs.get(session_id)
        if entry_log is None:
            return []
        if after is None:
            return list(entry_log.entries)
        key = pos_key(after)
        return [e for e in entry_log.entries if pos_key(e.pos) > key]

    async def last_pos(self, session_id: str) -> str:
        self._expire()
        entry_log = self._logs.get(session_id)
        return entry_log.entries[-1].pos if entry_log and entry_log.entries else "0-0"

    async def close(self, wait: float = 2.0) -> None:
        await super().close(wait)
        self._logs.clear()


@asynccontextmanager
async def _unavailable_on_error() -> AsyncIterator[None]:
    try:
        yield
    except RedisError as exc:
        raise LiveUnavailable(f"redis: {exc}") from exc


class RedisLiveChannel(LiveChannel):
    """Channels as Redis streams ``{prefix}live:{session id}``, shared by every server."""

    def __init__(
        self,
        url: str,
        ttl: float,
        prefix: str = "chatserver:",
        timeout: float | None = None,
        maxlen: int = MAXLEN,
    ) -> None:
        super().__init__(ttl, maxlen)
        self.prefix = prefix
        self._redis = aioredis.Redis.from_url(
            url, decode_responses=True, socket_timeout=timeout, socket_connect_timeout=timeout
        )
        # The reader blocks up to BLOCK_MS on its own connection.
        self._reader = aioredis.Redis.from_url(
            url,
            decode_responses=True,
            single_connection_client=True,
            socket_timeout=BLOCK_MS / 1000 + (timeout or 5.0),
            socket_connect_timeout=timeout or 5.0,
        )
        self._reader_id: int | None = None
        self._reading = False  # the reader is inside a blocking XREAD
        self._positions: dict[str, str] = {}  # followed stream key -> last position read
        self._changed = asyncio.Event()
        self._reader_task: asyncio.Task[None] | None = None
        self._closing = False

    def key(self, session_id: str) -> str:
        return f"{self.prefix}live:{session_id}"

    @property
    def _ttl_ms(self) -> int:
        return max(1, int(self.ttl * 1000))

    async def check(self) -> None:
        async with _unavailable_on_error():
            await self._redis.ping()

    async def publish(self, session_id: str, origin: str, frames: list[Frame]) -> None:
        if not frames:
            return
        key = self.key(session_id)
        async with _unavailable_on_error(), self._redis.pipeline(transaction=False) as pipe:
            for frame in frames:
                pipe.xadd(
                    key,
                    {"o": origin, "f": json.dumps(frame, ensure_ascii=False)},
                    maxlen=self.maxlen,
                    approximate=True,
                )
            pipe.pexpire(key, self._ttl_ms)
            await pipe.execute()

    @staticmethod
    def _entry(pos: str, fields: dict[str, str]) -> LiveEntry:
        return LiveEntry(pos, fields.get("o", ""), json.loads(fields["f"]))

    async def entries(self, session_id: str, after: str | None = None) -> list[LiveEntry]:
        low = "-" if after is None else "(" + after
        async with _unavailable_on_error():
            rows = await self._redis.xrange(self.key(session_id), min=low, max="+")
        return [self._entry(pos, fields) for pos, fields in rows]

    async def last_pos(self, session_id: str) -> str:
        async with _unavailable_on_error():
            rows = await self._redis.xrevrange(self.key(session_id), max="+", min="-", count=1)
        return rows[0][0] if rows else "0-0"

    def _watch_started(self, session_id: str, after: str) -> None:
        if self._closing:
            return
        self._positions[self.key(session_id)] = after
        self._changed.set()
        if self._reader_task is None or self._reader_task.done():
            self._reader_task = asyncio.create_task(self._read_loop())
        elif self._reading and self._reader_id is not None:
            self.spawn(self._unblock(self._reader_id))

    def _watch_ended(self, session_id: str) -> None:
        self._positions.pop(self.key(session_id), None)

    async def _unblock(self, client_id: int) -> None:
        try:
            await self._redis.client_unblock(client_id)
        except RedisError as exc:  # the read ends by itself within BLOCK_MS
            log.debug("could not interrupt the live reader: %s", exc)

    async def _read_loop(self) -> None:
        """Read every followed stream on one connection and hand entries to their followers."""
        pause = 0.1
        prefix_len = len(self.prefix) + len("live:")
        while not self._closing:
            if not self._positions:
                self._changed.clear()
                await self._changed.wait()
                continue
            try:
                if self._reader_id is None:
                    self._reader_id = await self._reader.client_id()
                self._changed.clear()
                streams = dict(self._positions)  # as of now: followers come and go meanwhile
                if not streams or self._closing:
                    continue
                self._reading = True
                try:
                    reply = await self._reader.xread(streams, count=READ_COUNT, block=BLOCK_MS)
                finally:
                    self._reading = False
                pause = 0.1
            except RedisError as exc:
                if self._closing:
                    return
                log.warning("live delivery: reading Redis failed (%s); retrying", exc)
                self._reader_id = None  # a new connection has another id
                await asyncio.sleep(pause)
                pause = min(2 * pause, 5.0)
                continue
            items = reply.items() if isinstance(reply, dict) else (reply or [])
            for key, rows in items:
                if isinstance(rows, list) and rows and isinstance(rows[0], list):
                    rows = rows[0]  # RESP3 shape: {key: [[entries]]}
                if key not in self._positions:
                    continue
                session_id = key[prefix_len:]
                for pos, fields in rows:
                    self._positions[key] = pos
                    self._deliver(session_id, self._entry(pos, fields))

    async def close(self, wait: float = 2.0) -> None:
        await super().close(wait)
        # The reader ends by itself, interrupted rather than cancelled: a command
        # cancelled mid-read makes redis-py tear its connection down, which can
        # take as long as the server does to answer.
        self._closing = True
        self._changed.set()
        task = self._reader_task
        if task is not None and not task.done():
            if self._reading and self._reader_id is not None:
                await self._unblock(self._reader_id)
            await asyncio.wait({task}, timeout=BLOCK_MS / 1000 + wait)
            if not task.done():
                task.cancel()
                await asyncio.wait({task}, timeout=wait)
        await self._reader.aclose()
        await self._redis.aclose()


def coalesce(frames: list[Frame]) -> list[Frame]:
    """Adjacent token frames of one reply as one: fewer entries when the channel lags."""
    out: list[Frame] = []
    for frame in frames:
        last = out[-1] if out else None
        if (
            last is not None
            and frame.get("type") == last.get("type") == "token"
            and frame["id"] == last["id"]
            and frame["offset"] == last["offset"] + len(last["content"])
        ):
            out[-1] = dict(last, content=last["content"] + frame["content"])
        else:
            out.append(frame)
    return out


class ReplyPublisher:
    """One reply's frames into its session's channel, in order, never holding up its client.

    ``send`` queues; one task at a time appends what is queued in one round
    trip, adjacent token frames merged (``coalesce``), so under load a reply
    takes fewer entries: followers see the same text in fewer, larger chunks. A channel that cannot be reached
    costs its watchers the reply, not its own client: it is logged once.
    """

    def __init__(self, channel: LiveChannel, session_id: str, origin: str) -> None:
        self.channel = channel
        self.session_id = session_id
        self.origin = origin
        self.ended = False
        self._pending: list[Frame] = []
        self._task: asyncio.Task[None] | None = None
        self._warned = False

    def send(self, frame: Frame) -> None:
        if self.ended:
            return
        self.ended = frame.get("type") in END_FRAMES
        self._pending.append(frame)
        if self._task is None or self._task.done():
            self._task = self.channel.spawn(self._flush())

    async def _flush(self) -> None:
        while self._pending:
            batch, self._pending = coalesce(self._pending), []
            try:
                await self.channel.publish(self.session_id, self.origin, batch)
            except LiveUnavailable as exc:
                if not self._warned:
                    self._warned = True
                    log.warning("session %s: live delivery failed: %s", self.session_id, exc)

    def finish(self, fallback: Frame) -> None:
        """End the reply in the channel: ``fallback`` if no done/error frame was sent."""
        if not self.ended:
            self.send(fallback)


async def hold_detached(
    channel: LiveChannel,
    session_id: str,
    reply_id: str,
    grace: float,
    cancel: Callable[[], None],
) -> None:
    """Keep a reply whose socket went away alive for ``grace`` s, for a client to resume it.

    Reads the channel from the reply's start: a ``resume`` of it (from any
    server, even one sent before its old socket was seen to close) keeps it
    running to its end; a ``cancel`` of it from its resumer stops it; no
    resume within ``grace`` seconds stops it (``cancel()``), as a plain
    disconnect would have. Returns once the reply ended either way.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    resumed = False
    try:
        reply = await channel.find_reply(session_id, reply_id)
        async with aclosing(channel.follow(session_id, reply.start if reply else None)) as entries:
            while True:
                try:
                    async with asyncio.timeout_at(None if resumed else deadline):
                        entry = await anext(entries)
                except TimeoutError:
                    cancel()
                    return
                frame = entry.frame
                if frame.get("id") != reply_id:
                    continue
                kind = frame.get("type")
                if kind == "resume":
                    resumed = True
                elif kind == "cancel" or kind in END_FRAMES:
                    if kind == "cancel":
                        cancel()
                    return
    except LiveUnavailable as exc:
        log.warning("session %s: cannot watch for a resume (%s)", session_id, exc)
        if not resumed:
            await asyncio.sleep(max(0.0, deadline - loop.time()))
            cancel()


def open_live(settings: Settings) -> LiveChannel:
    """The channel the settings ask for: Redis with --redis-url, else in this process."""
    if settings.redis_url:
        return RedisLiveChannel(
            settings.redis_url,
            ttl=settings.live_ttl,
            prefix=settings.redis_prefix,
            timeout=settings.redis_timeout,
        )
    return MemoryLiveChannel(ttl=settings.live_ttl)
