"""Per-client rate limits: requests per minute and generated tokens per minute.

One client (an API key, or an address when keys are off; the API layer decides)
must not take the whole server. ``admit`` is called once a request is
well-formed, before any prompt is rendered or tokenized, so a refused request
costs nothing; ``charge_tokens`` is called when its reply ends, with the tokens
it generated. Both refuse with ``RateLimited``, which says which limit tripped
and how long until a request would be let in (HTTP 429 ``rate_limited`` with a
``Retry-After`` header, or a WebSocket error frame with ``retry_after``).

The algorithm is a token bucket per client and limit, not a sliding window:

* a bucket holds ``limit`` units and refills at ``limit`` per minute, so a
  client may burst up to its per-minute limit and then goes on at that rate;
* its state is two numbers and a time (one small Redis hash), where an exact
  sliding window needs one entry per request (a sorted set), and a weighted
  pair of fixed windows has no exact answer for Retry-After;
* a reply's tokens are only known when it ends, and a bucket takes them as
  they come: it may go below zero (a reply is never cut short), and the next
  request waits until the debt is refilled. So ``--token-rate-limit`` holds
  every client to that many tokens a minute on average, however large its
  ``max_tokens``;
* Retry-After follows from the state: the time until the bucket holds one
  request (or one token) again.

A full bucket is the same as no bucket, so state is dropped once it would be
full: Redis keys expire then (TTL = time to refill), the memory backend sweeps
them out.

Backends: in memory (one server) or Redis (every server sharing the Redis
counts against the same buckets). In Redis each operation is ONE Lua script,
atomic, on Redis's own clock (``TIME``), so servers with skewed clocks agree.
When Redis cannot be reached the limiter fails open: requests are served and a
warning is logged (at most once a minute), because availability beats fairness
here; sessions in the same Redis fail loudly on their own.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from chatserver.config import Settings

log = logging.getLogger(__name__)

WINDOW_S = 60.0  # the limits are per minute
REQUESTS = "requests"
TOKENS = "tokens"
# Fail-open warnings, at most one per this many seconds.
WARN_EVERY_S = 60.0
# The limiter's Redis calls give up after this long and fail open: a slow or
# black-holed Redis must not hold up every request.
REDIS_TIMEOUT_S = 1.0


class RateLimited(Exception):
    """A client went over one of its limits; ``retry_after`` seconds until it may try again."""

    def __init__(self, limit: str, per_minute: int, retry_after: float) -> None:
        super().__init__(
            f"{limit} rate limit ({per_minute}/min) reached; retry in {retry_after:.1f}s"
        )
        self.limit = limit  # REQUESTS or TOKENS
        self.per_minute = per_minute
        self.retry_after = retry_after


class RateLimiter:
    """Both limits for every client; ``<= 0`` turns a limit off. This base limits nothing."""

    def __init__(self, requests_per_minute: int, tokens_per_minute: int) -> None:
        self.requests_per_minute = max(0, requests_per_minute)
        self.tokens_per_minute = max(0, tokens_per_minute)

    @property
    def enabled(self) -> bool:
        return bool(self.requests_per_minute or self.tokens_per_minute)

    def _refused(self, limit: str, retry_after: float) -> RateLimited:
        per_minute = self.requests_per_minute if limit == REQUESTS else self.tokens_per_minute
        return RateLimited(limit, per_minute, retry_after)

    async def admit(self, client: str) -> None:
        """Count one request of ``client``; raise RateLimited if it is over a limit.

        Refused when no request is left in its bucket, or when its generated
        tokens have used up the token budget.
        """

    async def charge_tokens(self, client: str, tokens: int) -> None:
        """Take a finished (or cancelled) reply's generated tokens from the client's budget."""

    async def close(self) -> None:
        pass


# --- in memory ---------------------------------------------------------------------


@dataclass(slots=True)
class _Bucket:
    requests: float
    tokens: float
    at: float


class MemoryRateLimiter(RateLimiter):
    """The buckets of one server process; the same arithmetic as the Lua scripts below."""

    def __init__(
        self,
        requests_per_minute: int,
        tokens_per_minute: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(requests_per_minute, tokens_per_minute)
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self._swept = clock()

    def __len__(self) -> int:
        """Clients with state kept (tests check idle clients leave nothing)."""
        return len(self._buckets)

    def _refilled(self, client: str, now: float) -> _Bucket:
        bucket = self._buckets.get(client)
        if bucket is None:
            return _Bucket(self.requests_per_minute, self.tokens_per_minute, now)
        elapsed = max(0.0, now - bucket.at)
        rpm, tpm = self.requests_per_minute, self.tokens_per_minute
        bucket.requests = min(rpm, bucket.requests + elapsed * rpm / WINDOW_S)
        bucket.tokens = min(tpm, bucket.tokens + elapsed * tpm / WINDOW_S)
        bucket.at = now
        return bucket

    def _full_in(self, bucket: _Bucket) -> float:
        """Seconds until the bucket is full again (then it can be forgotten)."""
        full_in = 0.0
        if self.requests_per_minute:
            need = self.requests_per_minute - bucket.requests
            full_in = need * WINDOW_S / self.requests_per_minute
        if self.tokens_per_minute:
            need = self.tokens_per_minute - bucket.tokens
            full_in = max(full_in, need * WINDOW_S / self.tokens_per_minute)
        return full_in

    def _sweep(self, now: float) -> None:
        if now - self._swept < WINDOW_S:
            return
        self._swept = now
        for client, bucket in list(self._buckets.items()):
            if self._full_in(bucket) <= now - bucket.at:
                del self._buckets[client]

    async def admit(self, client: str) -> None:
        if not self.enabled:
            return
        now = self._clock()
        self._sweep(now)
        bucket = self._refilled(client, now)
        wait, limit = 0.0, ""
        if self.tokens_per_minute and bucket.tokens < 1:
            wait, limit = (1 - bucket.tokens) * WINDOW_S / self.tokens_per_minute, TOKENS
        if self.requests_per_minute and bucket.requests < 1:
            request_wait = (1 - bucket.requests) * WINDOW_S / self.requests_per_minute
            if request_wait > wait:
                wait, limit = request_wait, REQUESTS
        if limit:
            raise self._refused(limit, wait)
        if self.requests_per_minute:
            bucket.requests -= 1
        self._buckets[client] = bucket

    async def charge_tokens(self, client: str, tokens: int) -> None:
        if not self.tokens_per_minute or tokens <= 0:
            return
        bucket = self._refilled(client, self._clock())
        bucket.tokens -= tokens
        self._buckets[client] = bucket


# --- in Redis ----------------------------------------------------------------------

# Shared by both scripts. KEYS[1]: the client's hash {req, tok, at}; ARGV: window
# seconds, requests/min, tokens/min (0 = off). A missing field is a full bucket.
_LUA_PRELUDE = """
if redis.replicate_commands then redis.replicate_commands() end
local key = KEYS[1]
local window = tonumber(ARGV[1])
local req_limit = tonumber(ARGV[2])
local tok_limit = tonumber(ARGV[3])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local state = redis.call('HMGET', key, 'req', 'tok', 'at')
local elapsed = math.max(0, now - (tonumber(state[3]) or now))
local function refill(level, limit)
  level = tonumber(level)
  if limit <= 0 then return 0 end
  if level == nil then return limit end
  return math.min(limit, level + elapsed * limit / window)
end
local req = refill(state[1], req_limit)
local tok = refill(state[2], tok_limit)
local function save()
  local full_in = 0
  if req_limit > 0 then full_in = (req_limit - req) * window / req_limit end
  if tok_limit > 0 then full_in = math.max(full_in, (tok_limit - tok) * window / tok_limit) end
  redis.call('HSET', key, 'req', tostring(req), 'tok', tostring(tok), 'at', tostring(now))
  redis.call('PEXPIRE', key, math.ceil(full_in * 1000) + 1000)
end
"""

# Returns {limit, retry_after}: limit '' when admitted (and counted).
_LUA_ADMIT = (
    _LUA_PRELUDE
    + """
local wait, limit = 0, ''
if tok_limit > 0 and tok < 1 then
  wait = (1 - tok) * window / tok_limit
  limit = 'tokens'
end
if req_limit > 0 and req < 1 then
  local request_wait = (1 - req) * window / req_limit
  if request_wait > wait then
    wait = request_wait
    limit = 'requests'
  end
end
if limit ~= '' then return {limit, tostring(wait)} end
if req_limit > 0 then req = req - 1 end
save()
return {'', '0'}
"""
)

# ARGV[4]: the tokens to take.
_LUA_CHARGE = (
    _LUA_PRELUDE
    + """
tok = tok - tonumber(ARGV[4])
save()
return 1
"""
)


class RedisRateLimiter(RateLimiter):
    """Buckets in Redis, shared by every server using it: ``{prefix}ratelimit:{client}``."""

    def __init__(
        self,
        url: str,
        requests_per_minute: int,
        tokens_per_minute: int,
        prefix: str = "chatserver:",
    ) -> None:
        import redis.asyncio as aioredis

        super().__init__(requests_per_minute, tokens_per_minute)
        self.prefix = prefix
        # A pool of its own, unlike the session store's: short timeouts, because
        # this one fails open instead of waiting.
        self._redis = aioredis.Redis.from_url(
            url,
            decode_responses=True,
            socket_timeout=REDIS_TIMEOUT_S,
            socket_connect_timeout=REDIS_TIMEOUT_S,
        )
        self._admit = self._redis.register_script(_LUA_ADMIT)
        self._charge = self._redis.register_script(_LUA_CHARGE)
        self._warned = -math.inf

    def key(self, client: str) -> str:
        return f"{self.prefix}ratelimit:{client}"

    def _args(self) -> list[float | int]:
        return [WINDOW_S, self.requests_per_minute, self.tokens_per_minute]

    def _fail_open(self, exc: Exception) -> None:
        now = time.monotonic()
        if now - self._warned >= WARN_EVERY_S:
            self._warned = now
            log.warning("rate limits not enforced: redis unreachable (%s)", exc)

    async def admit(self, client: str) -> None:
        from redis.exceptions import RedisError

        if not self.enabled:
            return
        try:
            limit, wait = await self._admit(keys=[self.key(client)], args=self._args())
        except (RedisError, OSError) as exc:
            self._fail_open(exc)
            return
        if limit:
            raise self._refused(limit, float(wait))

    async def charge_tokens(self, client: str, tokens: int) -> None:
        from redis.exceptions import RedisError

        if not self.tokens_per_minute or tokens <= 0:
            return
        try:
            await self._charge(keys=[self.key(client)], args=[*self._args(), tokens])
        except (RedisError, OSError) as exc:
            self._fail_open(exc)

    async def close(self) -> None:
        await self._redis.aclose()


def open_rate_limiter(settings: Settings) -> RateLimiter:
    """Redis-backed when there is a Redis (limits hold across servers), else in memory."""
    rpm, tpm = settings.rate_limit, settings.token_rate_limit
    if rpm <= 0 and tpm <= 0:
        return RateLimiter(0, 0)
    if settings.redis_url:
        return RedisRateLimiter(settings.redis_url, rpm, tpm, settings.redis_prefix)
    return MemoryRateLimiter(rpm, tpm)
