"""One async client per API mode; ``open_client`` builds one with its own HTTP session."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp

from load_tests.clients.base import Client
from load_tests.clients.openai_chat import OpenAIClient, served_model
from load_tests.clients.query import QueryClient
from load_tests.clients.ws import WebSocketClient

MODES = ("ws", "query", "openai")


@asynccontextmanager
async def open_client(
    mode: str,
    base_url: str,
    *,
    request_timeout: float = 300.0,
    model: str | None = None,
    fresh_connections: bool = False,
) -> AsyncIterator[Client]:
    """A client for ``mode`` with a connection pool that never limits concurrency.

    ``fresh_connections``: a new TCP connection a request, for servers that close a
    kept-alive connection after a streamed reply while advertising keep-alive
    (llama.cpp's llama-server does): reused, the next request on it fails.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    connector = aiohttp.TCPConnector(limit=0, force_close=fresh_connections)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout()) as s:
        if mode == "ws":
            yield WebSocketClient(s, base_url, request_timeout)
        elif mode == "query":
            yield QueryClient(s, base_url, request_timeout)
        else:
            yield OpenAIClient(
                s, base_url, request_timeout, model or await served_model(s, base_url)
            )


__all__ = ["MODES", "Client", "open_client"]
