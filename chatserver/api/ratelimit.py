"""Who a request counts against, and the rate limiter bound to that client.

Every entry point that generates (POST /v1/query, each /ws chat message,
POST /v1/chat/completions) calls ``admit()`` once the request is well-formed
and before any prompt work, and wraps its stream in ``metered()`` so that the
reply's generated tokens are charged when it ends, however it ends. A request
for ``n`` choices is one request and is charged the tokens of all its choices
(``metered_all``). The
limits themselves are in ``chatserver.limits.rate``; ``RateLimited`` becomes a
429 in ``api/errors.py``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiohttp import web

from chatserver.api.auth import principal
from chatserver.api.state import RATE_LIMITER
from chatserver.limits.rate import RateLimiter

if TYPE_CHECKING:
    from chatserver.engine.engine import GenerationStream


def client_id(request: web.Request) -> str:
    """Who limits count against: the API key's name, or the peer address without keys.

    The name, not the key: limiter keys in Redis never hold a credential.
    """
    caller = principal(request)
    if caller.authenticated:
        return f"key:{caller.name}"
    return f"addr:{request.remote or 'unknown'}"


@dataclass(frozen=True, slots=True)
class ClientLimits:
    """The server's rate limiter for one client."""

    limiter: RateLimiter
    client: str

    async def admit(self) -> None:
        """Raise RateLimited if this client may not start another generation now."""
        await self.limiter.admit(self.client)

    @asynccontextmanager
    async def metered(self, stream: GenerationStream) -> AsyncIterator[GenerationStream]:
        """``async with stream`` that charges the tokens it generated when it is left."""
        async with self.metered_all([stream]):
            yield stream

    @asynccontextmanager
    async def metered_all(
        self, streams: Sequence[GenerationStream]
    ) -> AsyncIterator[Sequence[GenerationStream]]:
        """metered() for one request's several generations (OpenAI's ``n``): each
        stream entered (leaving cancels those still running), and the tokens of all
        of them charged once: the request counts as one, its tokens as their sum."""
        try:
            async with AsyncExitStack() as entered:
                for stream in streams:
                    await entered.enter_async_context(stream)
                yield streams
        finally:
            tokens = sum(stream.completion_tokens for stream in streams)
            await self.limiter.charge_tokens(self.client, tokens)


def client_limits(request: web.Request) -> ClientLimits:
    return ClientLimits(request.app[RATE_LIMITER], client_id(request))
